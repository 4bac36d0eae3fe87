"""Method registry: one line per method (its config class; the class knows how to inject itself), and the
lookup from a PEFT ``adapter_config.json`` dictionary to the config class it describes."""

from __future__ import annotations

from typing import Any

from ..config import DeltaConfig
from ..errors import ConfigError
from .adapters import AdapterConfig, HoulsbyConfig, PfeifferConfig
from .asylora import AsyLoraConfig
from .dora import DoraConfig
from .ia3 import IA3Config
from .lora import LoraConfig
from .lyco import LoHaConfig, LoKrConfig
from .mora import MoraConfig
from .oft import OFTConfig
from .prefix import PrefixTuningConfig, PTuningV2Config
from .prompt import PromptTuningConfig, PTuningConfig
from .vera import VeraConfig

METHODS: dict[str, type[DeltaConfig]] = {
    "lora": LoraConfig,
    "dora": DoraConfig,
    "asylora": AsyLoraConfig,
    "mora": MoraConfig,
    "ia3": IA3Config,
    "vera": VeraConfig,
    "oft": OFTConfig,
    "loha": LoHaConfig, "lokr": LoKrConfig,
    "houlsby": HoulsbyConfig, "pfeiffer": PfeifferConfig,
    "prompt": PromptTuningConfig, "ptuning": PTuningConfig, "prefix": PrefixTuningConfig, "ptuning-v2": PTuningV2Config,
}



def config_from_peft_dict(data: Any) -> DeltaConfig:
    """Pick the registered config class for a PEFT ``adapter_config.json`` dictionary and build it."""
    if not isinstance(data, dict):
        raise ConfigError(f"adapter config must be a JSON object, got {type(data).__name__}")
    peft_type = data.get("peft_type")
    if not isinstance(peft_type, str):
        raise ConfigError("adapter config has no 'peft_type'; is this an adapter_config.json written by PEFT or deltatune?")
    for cls in METHODS.values():
        if cls.peft_type == peft_type and cls.accepts(data):
            return cls.from_peft_dict(data)
    known = sorted({cls.peft_type for cls in METHODS.values()})
    raise ConfigError(f"peft_type {peft_type!r} is not supported by deltatune; supported: {', '.join(known)}")


__all__ = ["config_from_peft_dict", "PromptTuningConfig", "PTuningConfig", "PrefixTuningConfig", "PTuningV2Config", "AdapterConfig", "AsyLoraConfig", "DoraConfig", "MoraConfig", "IA3Config", "HoulsbyConfig", "PfeifferConfig", "METHODS", "LoraConfig", "VeraConfig", "OFTConfig", "LoHaConfig", "LoKrConfig"]
