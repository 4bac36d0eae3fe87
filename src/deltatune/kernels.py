"""Optional fast paths ("kernels") for the hot deltas, registered per delta type through ``deltatune.protocol``.

Each method's ``forward`` is the plain formula and the reference; the kernels below (``deltatune.ops``: fused LoRA
and DoRA linear with memory-lean autograd) compute the same values and gradients (``tests/test_ops.py``).
``dt.kernels.disable()``, ``with dt.kernels.disabled(): ...`` or ``DELTATUNE_KERNELS=0`` in the environment run the
plain formulas instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .layers import DeltaLayer
from .methods.dora import DoraLinear
from .methods.lora import LoraLinear
from .ops import dora_linear, fusable_base, lora_add, lora_linear
from .protocol import kernels_enabled, register_kernel, set_kernels


def lora_fused(delta: LoraLinear, x: torch.Tensor, layer: DeltaLayer) -> torch.Tensor | None:
    """``base(x) + s B A drop(x)`` as one op when the base is a plain frozen float Linear/Conv1D, else None."""
    base = fusable_base(layer.base_layer, x)
    if base is None:
        return None
    return lora_linear(x, base[0], base[1], delta.lora_A.weight, delta.lora_B.weight, delta.scaling, delta.dropout_p())


def lora_added(delta: LoraLinear, x: torch.Tensor, out: torch.Tensor, layer: DeltaLayer) -> torch.Tensor:
    """``out + s B A drop(x)`` without storing the dropped input for backward (the mask is re-drawn)."""
    return lora_add(x, out, delta.lora_A.weight, delta.lora_B.weight, delta.scaling, delta.dropout_p())


def dora_fused(delta: DoraLinear, x: torch.Tensor, layer: DeltaLayer) -> torch.Tensor | None:
    """``g * (x (W0 + s B A)^T) + b`` as one op when dropout is off and the base is a plain frozen float
    Linear/Conv1D of the adapter's dtype, else None."""
    if delta.dropout_p() > 0:
        return None
    base = fusable_base(layer.base_layer, x)
    if base is None or base[0].dtype != delta.lora_A.weight.dtype:
        return None
    norm = delta.weight_norm(layer).to(base[0].dtype)
    return dora_linear(
        x, base[0], base[1], delta.lora_A.weight, delta.lora_B.weight, delta.lora_magnitude_vector, norm, delta.scaling
    )


register_kernel(LoraLinear, "fused", lora_fused)
register_kernel(LoraLinear, "add", lora_added)
register_kernel(DoraLinear, "fused", dora_fused)


def disable() -> None:
    """Run the plain formulas from now on."""
    set_kernels(False)


def enable() -> None:
    set_kernels(True)


def enabled() -> bool:
    return kernels_enabled()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Plain formulas inside the block."""
    previous = set_kernels(False)
    try:
        yield
    finally:
        set_kernels(previous)
