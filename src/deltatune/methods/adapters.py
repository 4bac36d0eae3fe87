"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"; Pfeiffer et al. 2020,
"AdapterFusion"): ``h -> h + W_up f(W_down h + b_down) + b_up`` on the output ``h`` of a sub-layer's output
projection, i.e. before that sub-layer's residual add (and LayerNorm, in post-LN models such as BERT).

Houlsby: two per block (attention output projection and FFN output projection). Pfeiffer: one per block, on the
FFN output projection. Where the projection is followed by dropout (BERT: ``LN(dropout(dense(h)) + input)``; GPT-2's
residual dropout), the adapter sits between the projection and dropout: at eval time this is exactly Houlsby's
placement (adapter after dropout); in training the sub-layer's dropout also masks the adapter's output. With ``m``
the bottleneck size and ``d`` the hidden size, each adapter has ``2*m*d + m + d`` parameters. Adapters are
nonlinear in ``h``, so they cannot be merged into weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..config import check_positive
from ..errors import ConfigError, TargetError
from ..layers import DeltaLayer, TrainableCopies, linear_features
from ..protocol import Delta, initialising
from ..targets import HEAD_NAMES, base_modules
from .base import LayerDeltaConfig

if TYPE_CHECKING:
    from ..model import DeltaModel

KINDS = ("houlsby", "pfeiffer")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh,
}
INITS = ("zero_up", "houlsby", "random")
_BERT = {
    "houlsby": ["attention.output.dense", "output.dense"],
    "pfeiffer": r".*\.layer\.\d+\.output\.dense",
}
_LLAMA = {"houlsby": ["o_proj", "down_proj"], "pfeiffer": ["down_proj"]}
# architecture (transformers model_type) -> the output projections to follow, per kind
DEFAULT_PLACEMENT: dict[str, dict[str, Any]] = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT,
    "distilbert": {"houlsby": ["attention.out_lin", "ffn.lin2"], "pfeiffer": ["ffn.lin2"]},
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA, "gemma2": _LLAMA,
    "gpt2": {"houlsby": ["attn.c_proj", "mlp.c_proj"], "pfeiffer": ["mlp.c_proj"]},
    "opt": {"houlsby": ["self_attn.out_proj", "fc2"], "pfeiffer": ["fc2"]},
    "gpt_neox": {"houlsby": ["attention.dense", "dense_4h_to_h"], "pfeiffer": ["dense_4h_to_h"]},
}
NORM_SUFFIXES = ("LayerNorm", "RMSNorm")


@dataclass
class AdapterConfig(LayerDeltaConfig):
    """Bottleneck adapter: ``h + W_up f(W_down h + b_down) + b_up`` on the output ``h`` of each targeted layer.

    kind: "houlsby" (attention + FFN output projections) or "pfeiffer" (FFN output projection only); it only
      picks the default ``targets`` (per architecture, see ``DEFAULT_PLACEMENT``); explicit ``targets`` win.
    bottleneck: size m; or reduction_factor: m = d // reduction_factor (default 16 when neither is given).
    nonlinearity: f, one of relu, gelu, swish (= silu), tanh.
    init: "zero_up" (W_down nn.Linear default, W_up and biases zero: exactly the base model at init),
      "houlsby" (W_down, W_up ~ N(0, 1e-2) truncated at 2 std, biases zero: near identity, not exact),
      "random" (nn.Linear's default init for every tensor: the model differs from the base).
    train_layernorms: also train (a per-adapter copy of) every LayerNorm/RMSNorm, as Houlsby et al. did.
    train_head: also train (a per-adapter copy of) the task head (classifier / score / qa_outputs / lm_head).
    """

    peft_type: ClassVar[str] = "BOTTLENECK"
    method: ClassVar[str] = "adapter"
    mergeable: ClassVar[bool] = False
    unmergeable_reason: ClassVar[str] = (
        "a bottleneck adapter is a nonlinear function of the layer output, not a weight update"
    )
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d_t")
    peft_keys: ClassVar[dict[str, str]] = {
        **LayerDeltaConfig.peft_keys,
        "kind": "adapter_kind", "bottleneck": "bottleneck_size", "reduction_factor": "reduction_factor",
        "nonlinearity": "non_linearity", "init": "init_weights", "train_layernorms": "train_layernorms",
        "train_head": "train_head", "bias": "bias",
    }

    kind: str = "houlsby"
    bottleneck: int | None = None
    reduction_factor: float | None = None
    nonlinearity: str = "relu"
    init: str = "zero_up"
    train_layernorms: bool = False
    train_head: bool = False

    @classmethod
    def accepts(cls, peft_dict: dict[str, Any]) -> bool:
        return cls is AdapterConfig or peft_dict.get("adapter_kind", "houlsby") == cls.__dataclass_fields__["kind"].default

    def validate(self) -> None:
        super().validate()
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        own_kind = type(self).__dataclass_fields__["kind"].default
        if type(self) is not AdapterConfig and self.kind != own_kind:
            raise ConfigError(f"{type(self).__name__} is kind {own_kind!r}; use AdapterConfig(kind={self.kind!r})")
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise ConfigError("give either bottleneck (size m) or reduction_factor (m = d // factor), not both")
        if self.bottleneck is not None and (
            isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck <= 0
        ):
            raise ConfigError(f"bottleneck must be a positive integer, got {self.bottleneck!r}")
        if self.reduction_factor is not None:
            check_positive("reduction_factor", self.reduction_factor)
        if self.nonlinearity not in ACTIVATIONS:
            raise ConfigError(f"nonlinearity must be one of {sorted(ACTIVATIONS)}, got {self.nonlinearity!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {list(INITS)}, got {self.init!r}")

    def size(self, hidden: int) -> int:
        """Bottleneck size m for a layer with output size ``hidden``."""
        if self.bottleneck is not None:
            return self.bottleneck
        return max(1, int(hidden // (self.reduction_factor or 16)))

    def default_targets(self, model: nn.Module) -> list[str] | str:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type in DEFAULT_PLACEMENT:
            return DEFAULT_PLACEMENT[model_type][self.kind]
        raise TargetError(
            f"no default {self.kind} adapter placement for model type {model_type or type(model).__name__}; pass "
            f"targets=[...] naming the attention and FFN output projections (e.g. ['o_proj', 'down_proj'])"
        )

    def create_delta(self, module: nn.Module, path: str) -> nn.Module:
        hidden = linear_features(module)[1]  # the layer's output size d (also for 4-bit packed weights)
        return BottleneckAdapter(hidden, self.size(hidden), self.nonlinearity, self.init)

    def inject(self, model: DeltaModel, name: str, paths: list[str]) -> None:
        """Add the adapters, then per-adapter trainable copies of the norms / head when asked for."""
        super().inject(model, name, paths)
        for path in self.extra_trainable_paths(model.model):
            host = model.host_at(path, TrainableCopies)
            if name not in host.copies:
                host.add_copy(name)

    def extra_trainable_paths(self, model: nn.Module) -> list[str]:
        """Paths of the norm layers (``train_layernorms``) and head (``train_head``) this adapter trains."""
        modules = dict(base_modules(model))
        found: list[str] = []
        if self.train_layernorms:
            norms = [
                p for p, m in modules.items()
                if type(m.base_layer if isinstance(m, TrainableCopies) else m).__name__.endswith(NORM_SUFFIXES)
            ]
            if not norms:
                raise TargetError("train_layernorms=True but the model has no LayerNorm/RMSNorm module")
            found += norms
        if self.train_head:
            heads = [p for p in modules if p.rpartition(".")[2] in HEAD_NAMES]
            heads = [p for p in heads if not any(p.startswith(q + ".") for q in heads)]
            if not heads:
                raise TargetError(
                    f"train_head=True but no module is named one of {sorted(HEAD_NAMES)}; "
                    f"name the head in modules_to_save=[...] instead"
                )
            found += heads
        return sorted(found)


@dataclass
class HoulsbyConfig(AdapterConfig):
    """``AdapterConfig(kind="houlsby")``: adapters after the attention and the FFN output projections."""

    method: ClassVar[str] = "houlsby"
    kind: str = "houlsby"


@dataclass
class PfeifferConfig(AdapterConfig):
    """``AdapterConfig(kind="pfeiffer")``: one adapter per block, after the FFN output projection.

    Same placement rule as Houlsby's FFN adapter (before the residual add); the AdapterHub "pfeiffer" variant that
    reads the post-LayerNorm sub-layer output is not reproduced.
    """

    method: ClassVar[str] = "pfeiffer"
    kind: str = "pfeiffer"


class BottleneckAdapter(Delta):
    """``h + W_up f(W_down h + b_down) + b_up`` with ``W_down`` [m, d], ``W_up`` [d, m], applied to the layer output."""

    transforms_output = True  # a function of the layer output: runs after weight deltas (see DeltaLayer)

    def __init__(self, hidden: int, size: int, nonlinearity: str, init: str) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(hidden, size)
        self.adapter_up = nn.Linear(size, hidden)
        self.act = ACTIVATIONS[nonlinearity]()
        if not initialising():  # a file fills them (protocol.no_init)
            return
        with torch.no_grad():
            if init == "houlsby":
                for linear in (self.adapter_down, self.adapter_up):
                    nn.init.trunc_normal_(linear.weight, std=1e-2, a=-2e-2, b=2e-2)
                    linear.bias.zero_()
            elif init == "zero_up":
                self.adapter_down.bias.zero_()
                self.adapter_up.weight.zero_()
                self.adapter_up.bias.zero_()
            # "random": nn.Linear's default init for every tensor

    def forward(self, x: torch.Tensor, out: torch.Tensor, layer: DeltaLayer) -> torch.Tensor:
        h = out.to(self.adapter_down.weight.dtype)
        return out + self.adapter_up(self.act(self.adapter_down(h))).to(out.dtype)

    def extra_repr(self) -> str:
        return f"d={self.adapter_down.in_features}, m={self.adapter_down.out_features}"
