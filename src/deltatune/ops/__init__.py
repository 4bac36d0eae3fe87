"""Pure-PyTorch autograd functions for the hot paths (fused LoRA linear, fused DoRA linear).

Each function equals its plain formula up to float rounding; tests/test_ops.py checks outputs and gradients.
"""

from .dora import dora_linear, dora_linear_reference
from .dropout import keep_mask
from .lora import fusable_base, lora_add, lora_linear, lora_linear_reference

__all__ = [
    "dora_linear", "dora_linear_reference", "fusable_base", "keep_mask", "lora_add", "lora_linear", "lora_linear_reference",
]
