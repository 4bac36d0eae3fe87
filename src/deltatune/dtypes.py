"""The dtype rules, one place each: what dtype adapter tensors live in next to a base tensor, and what precision
adapter arithmetic (combining, re-padding factors) runs in."""

from __future__ import annotations

import torch

HALF = (torch.float16, torch.bfloat16)


def adapter_dtype(base: torch.dtype) -> torch.dtype:
    """The dtype of adapter tensors added to a base tensor of dtype ``base``: float32 next to a half-precision
    (float16 / bfloat16) or non-float (e.g. quantized) base, else the base's own (float32, float64)."""
    return torch.float32 if base in HALF or not base.is_floating_point else base


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision to compute with tensors of ``dtype``: float64 stays float64, anything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
