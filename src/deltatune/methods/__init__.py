"""Method registry: one line per method (its config class; the class knows how to inject itself)."""

from __future__ import annotations

from ..config import DeltaConfig
from .adapters import AdapterConfig, HoulsbyConfig, PfeifferConfig
from .lora import LoraConfig

METHODS: dict[str, type[DeltaConfig]] = {
    "lora": LoraConfig,
    "houlsby": HoulsbyConfig, "pfeiffer": PfeifferConfig,
}

__all__ = ["AdapterConfig", "HoulsbyConfig", "PfeifferConfig", "METHODS", "LoraConfig"]
