"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") and rsLoRA scaling
(Kalajdzievski 2023): ``y = W0 x + s * B A drop(x)`` with A [r, in] random, B [out, r] zero, s = alpha / r
(rsLoRA: alpha / sqrt(r))."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_positive, check_positive_int, check_probability
from ..errors import ConfigError, TargetError
from ..layers import DeltaLayer, layer_kind, linear_features
from ..protocol import dropout_module, initialising
from .base import LayerDeltaConfig, MergeableDelta, check_patterns, pattern_value
from .lora_batched import EmbeddingRows, LowRankRows
from .lora_init import PRINCIPAL_INITS, export_plain_lora, principal_init

INITS = {"kaiming", "gaussian", "random"}
_INIT_TO_PEFT: dict[str, Any] = {"kaiming": True, "random": False}


@dataclass
class LoraConfig(LayerDeltaConfig):
    """LoRA: ``y = W0 x + s * B A drop(x)``.

    r: rank; alpha: scale numerator (s = alpha/r, or alpha/sqrt(r) with rslora); dropout on the LoRA input;
    init: "kaiming" (A kaiming-uniform, B zero; PEFT's default), "gaussian" (A ~ N(0, 1/r), B zero),
    "random" (A and B random: the model differs from the base; PEFT's init_lora_weights=False),
    "pissa" / "olora" (A, B from the SVD / QR of W0, which is replaced by the residual; see ``lora_init``);
    fan_in_fan_out: detected per layer (True for transformers' Conv1D, whose weight is [in, out]); the field
      exists for PEFT files, where it is written as True when any targeted layer is a Conv1D;
    rank_pattern / alpha_pattern: per-module overrides, keys are regexes matched against the end of the path.
    """

    peft_type: ClassVar[str] = "LORA"
    method: ClassVar[str] = "lora"
    peft_keys: ClassVar[dict[str, str]] = {
        **LayerDeltaConfig.peft_keys,
        "r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "bias": "bias", "rslora": "use_rslora",
        "init": "init_lora_weights", "fan_in_fan_out": "fan_in_fan_out",
        "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern",
    }
    peft_fixed: ClassVar[dict[str, Any]] = {
        "use_dora": False, "lora_bias": False, "layer_replication": None, "target_parameters": None,
        "use_qalora": False, "trainable_token_indices": None, "alora_invocation_tokens": None,
        "use_bdlora": None,
    }

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    fan_in_fan_out: bool | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @classmethod
    def accepts(cls, peft_dict: dict[str, Any]) -> bool:
        return not peft_dict.get("use_dora", False)

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        check_positive("alpha", self.alpha)
        check_probability("dropout", self.dropout)
        if not isinstance(self.rslora, bool):
            raise ConfigError(f"rslora must be true or false, got {self.rslora!r}")
        check_patterns(self.rank_pattern, self.alpha_pattern)
        if not isinstance(self.init, str) or self.init not in self.inits():
            raise ConfigError(f"init must be one of {sorted(self.inits())}, got {self.init!r}")

    @classmethod
    def inits(cls) -> set[str]:
        return INITS | PRINCIPAL_INITS

    def inject(self, model: Any, name: str, paths: list[str]) -> None:
        if self.init in PRINCIPAL_INITS and not initialising():
            raise ConfigError(
                f"init={self.init!r} derives the adapter from the base weights and rewrites them, so it cannot be "
                f"built empty for filling; build it with init=True, or load its file with dt.load (which converts it)"
            )
        super().inject(model, name, paths)
        if self.init in PRINCIPAL_INITS:
            principal_init(model, name, paths, self.init, LoraLinear)

    def export_for_save(self, model: Any, name: str, data: dict, tensors: dict) -> tuple[dict, dict]:
        """PiSSA/OLoRA adapters are saved as plain rank-2r LoRA on the original base (as PEFT converts them)."""
        if self.init in PRINCIPAL_INITS:
            return export_plain_lora(model, name, data, tensors)
        return data, tensors

    @classmethod
    def encode(cls, name: str, value: Any) -> Any:
        if name == "init":
            return _INIT_TO_PEFT.get(value, value)
        if name == "fan_in_fan_out":
            return bool(value)
        return value

    @classmethod
    def decode(cls, name: str, value: Any) -> Any:
        if name == "init":
            if value is True:
                return "kaiming"
            if value is False:
                return "random"
            if str(value).lower().startswith("pissa_niter_"):
                raise ConfigError(
                    f"init_lora_weights {value!r}: PiSSA from a randomized SVD cannot be re-derived from the base "
                    f"weights; convert the adapter with PEFT first (save_pretrained(out, "
                    f"path_initial_model_for_weight_conversion=<the adapter saved right after init>)), or merge it "
                    f"there (merge_and_unload) and use the merged model"
                )
            return str(value).lower()
        if name == "fan_in_fan_out":
            return None  # always detected per layer from its type; the file value only informs PEFT
        return value

    def scaling(self, path: str) -> float:
        r = pattern_value(self.rank_pattern, path, self.r)
        alpha = pattern_value(self.alpha_pattern, path, self.alpha)
        return alpha / (math.sqrt(r) if self.rslora else r)

    def create_delta(self, module: nn.Module, path: str) -> nn.Module:
        r = pattern_value(self.rank_pattern, path, self.r)
        kind = layer_kind(module)
        if kind == "embedding":
            return LoraEmbedding(module.num_embeddings, module.embedding_dim, r, self.scaling(path), self.init)
        if kind == "conv":
            return LoraConv(module, r, self.scaling(path), self.dropout, self.init)
        fan_in_fan_out = kind == "conv1d_t"
        in_features, out_features = linear_features(module)
        return LoraLinear(in_features, out_features, r, self.scaling(path), self.dropout, self.init, fan_in_fan_out)


def init_pair(a: torch.Tensor, b: torch.Tensor, init: str, r: int) -> None:
    """Initialise A and B of a Linear/Conv LoRA pair in place."""
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(a, std=1 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init == "random":
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            b.zero_()


class LoraLinear(MergeableDelta):
    """``out + s * B(A(drop(x)))`` for ``nn.Linear`` and transformers' ``Conv1D`` (``dW = s * B A``, transposed
    to [in, out] for Conv1D)."""

    def __init__(
        self, in_features: int, out_features: int, r: int, scaling: float, dropout: float, init: str | None,
        fan_in_fan_out: bool,
    ) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.dropout = dropout_module(dropout)
        self.scaling = scaling
        self.fan_in_fan_out = fan_in_fan_out
        if init is not None and initialising():  # None: the caller sets both (AsyLoRA); else a file fills them
            init_pair(self.lora_A.weight, self.lora_B.weight, init, r)

    row_stackers = (LowRankRows,)  # mixed-adapter batches: stacked with the layer's other LoRA pairs
    restartable = True

    def forward(self, x: torch.Tensor, out: torch.Tensor, layer: DeltaLayer) -> torch.Tensor:
        dtype = self.lora_A.weight.dtype
        return out + (self.lora_B(self.lora_A(self.dropout(x.to(dtype)))) * self.scaling).to(out.dtype)

    def delta_weight(self, layer: DeltaLayer) -> torch.Tensor:
        weight = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return weight.T if self.fan_in_fan_out else weight

    def param_roles(self) -> dict[str, str]:
        return {"lora_A.weight": "A", "lora_B.weight": "B"}

    @torch.no_grad()
    def restart(self) -> None:
        """A Kaiming, B zero: ``dW = 0``."""
        init_pair(self.lora_A.weight, self.lora_B.weight, "kaiming", self.lora_A.weight.shape[0])

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B [out, r], A [r, in])``, live: ``dW = s B A`` as an [out, in] matrix (``deltatune.combine``)."""
        return self.lora_B.weight, self.lora_A.weight


class LoraEmbedding(MergeableDelta):
    """``out + s * (A^T[ids]) B^T``: the usual embedding convention, A [r, vocab] zero, B [dim, r] normal."""

    row_stackers = (EmbeddingRows,)
    restartable = True

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int, scaling: float, init: str) -> None:
        super().__init__()
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.zeros(embedding_dim, r))
        self.scaling = scaling
        if not initialising():
            return
        with torch.no_grad():
            if init == "random":
                self.lora_embedding_A.normal_()
            self.lora_embedding_B.normal_()

    def forward(self, ids: torch.Tensor, out: torch.Tensor, layer: DeltaLayer) -> torch.Tensor:
        base = layer.base_layer
        after_a = F.embedding(
            ids, self.lora_embedding_A.T, base.padding_idx, base.max_norm, base.norm_type,
            base.scale_grad_by_freq, base.sparse,
        )
        return out + ((after_a @ self.lora_embedding_B.T) * self.scaling).to(out.dtype)

    def delta_weight(self, layer: DeltaLayer) -> torch.Tensor:
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling

    def param_roles(self) -> dict[str, str]:
        return {"lora_embedding_A": "A_embedding", "lora_embedding_B": "B_embedding"}

    @torch.no_grad()
    def restart(self) -> None:
        """A zero, B normal: ``dW = 0`` (the usual embedding init)."""
        self.lora_embedding_A.zero_()
        self.lora_embedding_B.normal_()

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B [dim, r], A [r, vocab])``, live: ``s B A`` is ``dW^T`` ([dim, vocab])."""
        return self.lora_embedding_B, self.lora_embedding_A


class LoraConv(MergeableDelta):
    """``out + s * B(A(drop(x)))`` for ConvNd: A is a conv with the base's kernel/stride/padding/dilation and r
    output channels, B a 1x1 conv; ``dW[o, i, k] = s * sum_j B[o, j] A[j, i, k]``."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, init: str) -> None:
        super().__init__()
        if base.groups != 1:
            raise TargetError(f"LoRA on grouped convolutions (groups={base.groups}) is not supported; exclude that layer")
        conv = type(base) if type(base) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else nn.Conv2d
        ones = (1,) * len(base.kernel_size)
        self.lora_A = conv(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
            bias=False, padding_mode=base.padding_mode,
        )
        self.lora_B = conv(r, base.out_channels, ones, ones, bias=False)
        self.dropout = dropout_module(dropout)
        self.scaling = scaling
        if initialising():  # else a file fills them (protocol.no_init)
            init_pair(self.lora_A.weight, self.lora_B.weight, init, r)

    def forward(self, x: torch.Tensor, out: torch.Tensor, layer: DeltaLayer) -> torch.Tensor:
        dtype = self.lora_A.weight.dtype
        update = self.lora_B(self.lora_A(self.dropout(x.to(dtype)))) * self.scaling
        return out + update.to(out.dtype)

    restartable = True
    param_roles = LoraLinear.param_roles
    restart = LoraLinear.restart

    def delta_weight(self, layer: DeltaLayer) -> torch.Tensor:
        b = self.lora_B.weight.float().flatten(1)
        return torch.einsum("or,ri...->oi...", b, self.lora_A.weight.float()) * self.scaling

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B [out, r], A [r, in * kernel])``, live views: ``s B A`` is ``dW`` flattened to [out, in * kernel]."""
        return self.lora_B.weight.flatten(1), self.lora_A.weight.flatten(1)
