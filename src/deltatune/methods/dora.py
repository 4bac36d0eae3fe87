"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353).

``W' = m * V / ||V||`` with ``V = W0 + s B A`` and the norm taken per output row (over the input dim of an
[out, in] weight). m starts at ``||W0 + s B A||`` (= ``||W0||`` with B = 0); the norm is treated as a constant in
backward (paper section 4.3), so only m, A and B get gradients. With ``g = m / ||V||`` and LoRA dropout ``drop``:

    y = W0 x + b + (g - 1) * W0 drop(x) + g * s B A drop(x)          (as the paper's code and HF PEFT)

Lean norm: ``||W0_i + s B_i A||^2 = ||W0_i||^2 + 2 s B_i . (A W0_i^T) + s^2 B_i (A A^T) B_i^T`` needs only an
[r, out] and an [r, r] product per step; ``||W0_i||^2`` is cached (keyed on the weight's storage, version and the
layer's merged list). Norms are computed in float32 and never enter the autograd graph.
Output: without active dropout (p = 0 or eval) ``W0 x`` is the base output minus its bias, so
``y = g * (out + s B A x) + (1 - g) b`` costs no extra matmul, two [tokens, out] elementwise ops (one ``addcmul``)
and keeps a single [tokens, out] tensor for backward; s multiplies the [tokens, r] intermediate.
With active dropout ``W0 drop(x)`` is a different vector from ``W0 x`` and needs one extra matmul (no identity
recovers it from ``W0 x``), but no bias handling and again a single saved [tokens, out] tensor.
Several adapters on one layer: DoRA's reference weight W0 is the layer's stored weight (base plus adapters already
merged); unmerged adapters add on top. Merging DoRA first (``model.merge(["dora", ...])``) keeps the merged model
equal to the unmerged one; merging another adapter first changes the W0 that DoRA normalises.
PEFT interop: ``peft_type "LORA"`` with ``use_dora: true``; magnitude saved as ``<path>.lora_magnitude_vector``.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MergeError, TargetError
from ..layers import DeltaLayer, base_weight, layer_kind, linear_features
from ..protocol import Delta, RowIndex, RowStacker, initialising, stack_slots, tensor_state
from .lora import INITS, LoraConfig, LoraLinear, pattern_value
from .lora_batched import LowRankRows


@dataclass
class DoraConfig(LoraConfig):
    """DoRA on Linear and transformers Conv1D layers; same fields as ``LoraConfig``."""

    peft_type: ClassVar[str] = "LORA"
    method: ClassVar[str] = "dora"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d_t")
    peft_fixed: ClassVar[dict[str, Any]] = {**LoraConfig.peft_fixed, "use_dora": True}

    @classmethod
    def accepts(cls, peft_dict: dict[str, Any]) -> bool:
        return bool(peft_dict.get("use_dora", False))

    @classmethod
    def inits(cls) -> set[str]:
        return INITS

    def create_delta(self, module: nn.Module, path: str) -> nn.Module:
        kind = layer_kind(module)
        if kind not in self.supported_kinds:
            raise TargetError(f"DoRA supports Linear and Conv1D layers; '{path}' is {type(module).__name__}. Exclude it")
        r = pattern_value(self.rank_pattern, path, self.r)
        fan_in_fan_out = kind == "conv1d_t"
        in_features, out_features = linear_features(module)
        weight = base_weight(module) if initialising() else None  # a file holds m: no dequantization then
        return DoraLinear(weight, in_features, out_features, r, self.scaling(path), self.dropout, self.init, fan_in_fan_out)


class DoraGainRows(RowStacker):
    """Mixed-adapter batches: DoRA's rescaling, after every additive term. With ``out`` the bare base output (each
    row has one adapter) and ``L_i`` the row's low-rank term (``LowRankRows``, the stack DoRA shares with LoRA)::

        y_i = g_k * (out_i + L_i) + (1 - g_k) * b          g = m / ||W0 + s B A|| per output row

    with ``g`` stacked [n+1, out] and exactly 1 at every other slot, so non-DoRA rows stay ``out_i + L_i``. ``g``
    depends on the base weight, which ``layer_state`` reports so that an edit of it rebuilds the stack."""

    phase = "after"
    attributes = ("scaling",)

    @classmethod
    def build(cls, layer: Any, members: list[tuple[int, Delta]], n_slots: int) -> torch.Tensor:
        m = [(k, d.lora_magnitude_vector, d.weight_norm(layer)) for k, d in members]
        gains = [(k, magnitude / norm.to(magnitude.dtype)) for k, magnitude, norm in m]
        return stack_slots(gains, n_slots, fill=1.0)

    @classmethod
    def apply(cls, state: torch.Tensor, layer: Any, rows: RowIndex, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        g = state[rows.slots].reshape(x.shape[0], *([1] * (out.dim() - 2)), -1)
        bias = layer._parameters.get("bias")
        return g * out if bias is None else torch.addcmul(bias.to(out.dtype) * (1 - g), g, out)

    @classmethod
    def layer_state(cls, layer: Any) -> Hashable:
        return tensor_state(layer._parameters.get("weight")), tuple(layer.merged)


class DoraLinear(LoraLinear):
    """LoRA pair plus the magnitude vector ``lora_magnitude_vector`` [out]."""

    row_stackers = (LowRankRows, DoraGainRows)  # mixed batches: LoRA's stack for s B A x, then the gain
    restartable = False  # dW depends on W0 through the norm: merging and re-initialising is not a restart

    def param_roles(self) -> dict[str, str]:
        return {**super().param_roles(), "lora_magnitude_vector": "magnitude"}

    def __init__(
        self, weight: torch.Tensor | None, in_features: int, out_features: int, r: int, scaling: float, dropout: float,
        init: str, fan_in_fan_out: bool,
    ) -> None:
        """m starts at ``||W0 + s B A||`` of the layer's weight; ``weight`` is None when a file fills m."""
        super().__init__(in_features, out_features, r, scaling, dropout, init, fan_in_fan_out)
        self.lora_magnitude_vector = nn.Parameter(torch.empty(out_features))
        self._cache_key: tuple | None = None
        self._w0_sq: torch.Tensor | None = None
        self._merge_scale: torch.Tensor | None = None  # g used at merge time, so unmerge inverts exactly that map
        if initialising():
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self.full_norm(weight.detach()))

    # ---- norms -------------------------------------------------------------------------------------------------
    def _oi(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as [out, in]."""
        return weight.T if self.fan_in_fan_out else weight

    def full_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||W + s B A||`` per output row, materialising the full matrix (init and merge only)."""
        v = self._oi(weight).float() + self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        return torch.linalg.vector_norm(v, dim=1)

    def base_sq_norm(self, layer: DeltaLayer) -> torch.Tensor:
        """Cached ``||W0_i||^2`` (float32) of the layer's current weight."""
        weight = layer.weight_for_merge
        if torch.compiler.is_compiling():  # the storage-keyed cache cannot be traced; inside a graph it is cheap
            return torch.linalg.vector_norm(self._oi(weight.detach()).float(), dim=1).square()
        key = (weight.data_ptr(), weight._version, tuple(layer.merged), weight.device, weight.dtype)
        if self._w0_sq is None or self._cache_key != key:
            with torch.no_grad():
                self._w0_sq = torch.linalg.vector_norm(self._oi(weight.detach()).float(), dim=1).square()
            self._cache_key = key
        return self._w0_sq

    def clear_cache(self) -> None:
        """Forget the cached ``||W0||^2`` (only needed after editing ``weight.data`` by hand)."""
        self._cache_key, self._w0_sq = None, None

    @torch.no_grad()
    def weight_norm(self, layer: DeltaLayer) -> torch.Tensor:
        """``||W0_i + s B_i A||`` per output row via r x out and r x r products, float32, no graph."""
        weight = layer.weight_for_merge.detach()
        a = self.lora_A.weight.detach().float()
        b = self.lora_B.weight.detach().float()
        w = weight if weight.dtype == torch.float32 else weight.float()
        aw = a @ w if self.fan_in_fan_out else a @ w.T  # [r, out] = A W0^T
        s = self.scaling
        sq = self.base_sq_norm(layer) + 2 * s * (b * aw.T).sum(1) + s * s * ((b @ (a @ a.T)) * b).sum(1)
        return sq.clamp_min(0).sqrt()

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, out: torch.Tensor, layer: DeltaLayer) -> torch.Tensor:
        dtype = self.lora_A.weight.dtype
        xd = self.dropout(x.to(dtype))
        g = self.lora_magnitude_vector / self.weight_norm(layer).to(dtype)
        lora = self.lora_B(self.lora_A(xd) * self.scaling)  # scale the [tokens, r] intermediate, not [tokens, out]
        dropped = self.dropout_p() > 0  # the protocol's rule (dropout modules are built only for p > 0)
        if not dropped and layer.only_delta(self):
            # out = W0 x + b  =>  y = g (W0 x + s B A x) + b = g (out + lora) + (1 - g) b
            bias = layer._parameters.get("bias")
            total = out.to(dtype) + lora
            if bias is None:
                return (g * total).to(out.dtype)
            return torch.addcmul(bias.to(dtype) * (1 - g), g, total).to(out.dtype)
        base = F.linear(xd, self._oi(layer.weight_for_merge).to(dtype))  # W0 drop(x): y = out - base + g (base + lora)
        return torch.addcmul(out.to(dtype) - base, g, base + lora).to(out.dtype)

    # ---- merging -----------------------------------------------------------------------------------------------
    def low_rank_factors(self) -> None:  # type: ignore[override]
        """None: dW is not s B A (the magnitude rescales rows); combining uses the dense ``delta_weight``."""
        return None

    def delta_weight(self, layer: DeltaLayer) -> torch.Tensor:
        """``dW = g * (W0 + s B A) - W0`` in the layout of ``layer.weight`` (float32)."""
        weight = self._oi(layer.weight_for_merge.detach()).float()
        g = self.lora_magnitude_vector.detach().float() / self.full_norm(layer.weight_for_merge.detach())
        lora = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        dw = g[:, None] * (weight + lora) - weight
        return dw.T if self.fan_in_fan_out else dw

    @torch.no_grad()
    def merge_into(self, layer: DeltaLayer, safe: bool = True) -> None:
        weight = layer.weight_for_merge
        g = self.lora_magnitude_vector.float() / self.full_norm(weight.detach())
        lora = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        merged = g[:, None] * (self._oi(weight.detach()).float() + lora)
        if safe and not (torch.isfinite(merged).all() and torch.isfinite(g).all() and (g != 0).all()):
            raise MergeError("merging DoRA would put NaN/inf/zero rows into the weights; nothing was changed")
        weight.data.copy_((merged.T if self.fan_in_fan_out else merged).to(weight.dtype))
        self._merge_scale = g
        self.clear_cache()

    @torch.no_grad()
    def unmerge_from(self, layer: DeltaLayer) -> None:
        """``W0 = W' / g - s B A`` with the g stored at merge time (the norm of W' itself would be wrong)."""
        if self._merge_scale is None:
            raise MergeError("DoRA adapter has no stored merge scale; it was not merged by this process")
        weight = layer.weight_for_merge
        lora = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        restored = self._oi(weight.detach()).float() / self._merge_scale[:, None] - lora
        weight.data.copy_((restored.T if self.fan_in_fan_out else restored).to(weight.dtype))
        self._merge_scale = None
        self.clear_cache()
