"""AsyLoRA (Zhu et al. 2024, "Asymmetry in Low-Rank Adapters of Foundation Models", arXiv 2402.16842).

``y = W0 x + s * B A drop(x)`` with A [r, in] frozen to random orthonormal rows (Q of the QR decomposition of a
Gaussian matrix, signs fixed so the draw is Haar-uniform) and only B [out, r] trained: half the trainable
parameters of LoRA at equal r (for square layers). A is not trainable but is saved with the adapter, since it is
needed to reproduce the delta. Files use the PEFT layout (``lora_A.weight``, ``lora_B.weight``) with
``peft_type "ASYLORA"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import TargetError
from ..layers import layer_kind, linear_features
from ..protocol import initialising
from .base import frozen
from .lora import LoraConfig, LoraLinear, pattern_value

ASY_INITS = {"orthogonal", "random"}


def orthonormal_rows(r: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """An [r, n] matrix with orthonormal rows, uniformly distributed (requires r <= n)."""
    gaussian = torch.randn(n, r, generator=generator, dtype=torch.float64)
    q, upper = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(upper))).T.contiguous().float()


@dataclass
class AsyLoraConfig(LoraConfig):
    """AsyLoRA on Linear and transformers Conv1D layers.

    init: "orthogonal" (A orthonormal rows, B zero), "random" (B random too: the model differs from the base).
    """

    peft_type: ClassVar[str] = "ASYLORA"
    method: ClassVar[str] = "asylora"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d_t")
    peft_fixed: ClassVar[dict[str, Any]] = {}

    init: str = "orthogonal"

    @classmethod
    def accepts(cls, peft_dict: dict[str, Any]) -> bool:
        return True

    @classmethod
    def inits(cls) -> set[str]:
        return ASY_INITS

    @classmethod
    def encode(cls, name: str, value: Any) -> Any:
        return bool(value) if name == "fan_in_fan_out" else value

    @classmethod
    def decode(cls, name: str, value: Any) -> Any:
        return value

    def create_delta(self, module: nn.Module, path: str) -> nn.Module:
        kind = layer_kind(module)
        if kind not in self.supported_kinds:
            raise TargetError(f"AsyLoRA supports Linear and Conv1D layers; '{path}' is {type(module).__name__}")
        r = pattern_value(self.rank_pattern, path, self.r)
        fan_in_fan_out = kind == "conv1d_t"
        in_features, out_features = linear_features(module)
        if r > in_features:
            raise TargetError(f"AsyLoRA needs r <= in_features for orthonormal rows; '{path}' has {in_features} < r={r}")
        lora_init = "random" if self.init == "random" else None  # None: A and B are set here
        delta = LoraLinear(in_features, out_features, r, self.scaling(path), self.dropout, lora_init, fan_in_fan_out)
        if initialising():
            with torch.no_grad():
                if lora_init is None:
                    delta.lora_B.weight.zero_()
                delta.lora_A.weight.copy_(orthonormal_rows(r, in_features))
        frozen(delta.lora_A)
        return delta
