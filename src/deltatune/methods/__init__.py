"""Method registry: one line per method (its config class; the class knows how to inject itself)."""

from __future__ import annotations

from ..config import DeltaConfig
from .adapters import AdapterConfig, HoulsbyConfig, PfeifferConfig
from .asylora import AsyLoraConfig
from .dora import DoraConfig
from .lora import LoraConfig
from .mora import MoraConfig
from .prefix import PrefixTuningConfig, PTuningV2Config
from .prompt import PromptTuningConfig, PTuningConfig

METHODS: dict[str, type[DeltaConfig]] = {
    "lora": LoraConfig,
    "dora": DoraConfig,
    "asylora": AsyLoraConfig,
    "mora": MoraConfig,
    "houlsby": HoulsbyConfig, "pfeiffer": PfeifferConfig,
    "prompt": PromptTuningConfig, "ptuning": PTuningConfig, "prefix": PrefixTuningConfig, "ptuning-v2": PTuningV2Config,
}

__all__ = ["PromptTuningConfig", "PTuningConfig", "PrefixTuningConfig", "PTuningV2Config", "AdapterConfig", "AsyLoraConfig", "DoraConfig", "MoraConfig", "HoulsbyConfig", "PfeifferConfig", "METHODS", "LoraConfig"]
