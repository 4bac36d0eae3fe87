"""Method registry: one line per method (its config class; the class knows how to inject itself)."""

from __future__ import annotations

from ..config import DeltaConfig
from .adapters import AdapterConfig, HoulsbyConfig, PfeifferConfig
from .lora import LoraConfig
from .prefix import PrefixTuningConfig, PTuningV2Config
from .prompt import PromptTuningConfig, PTuningConfig

METHODS: dict[str, type[DeltaConfig]] = {
    "lora": LoraConfig,
    "houlsby": HoulsbyConfig, "pfeiffer": PfeifferConfig,
    "prompt": PromptTuningConfig, "ptuning": PTuningConfig, "prefix": PrefixTuningConfig, "ptuning-v2": PTuningV2Config,
}

__all__ = ["PromptTuningConfig", "PTuningConfig", "PrefixTuningConfig", "PTuningV2Config", "AdapterConfig", "HoulsbyConfig", "PfeifferConfig", "METHODS", "LoraConfig"]
