"""Method registry: one line per method (its config class; the class knows how to inject itself)."""

from __future__ import annotations

from ..config import DeltaConfig
from .lora import LoraConfig

METHODS: dict[str, type[DeltaConfig]] = {
    "lora": LoraConfig,
}

__all__ = ["METHODS", "LoraConfig"]
