"""deltatune: parameter-efficient fine-tuning for PyTorch models (LoRA family, prompts, prefixes, adapters)."""

from __future__ import annotations

from . import batching, combine, hotswap, kernels, quiet  # noqa: F401  (each installs its strategies or kernels)
from .config import DeltaConfig
from .errors import AdapterFileError, ConfigError, DeltatuneError, MergeError, TargetError
from .io import load, save
from .methods import (
    METHODS,
    AdapterConfig,
    AsyLoraConfig,
    DoraConfig,
    HoulsbyConfig,
    LoraConfig,
    MoraConfig,
    PfeifferConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    PTuningV2Config,
)
from .model import DeltaModel, wrap
from .optim import ReLoRA, loraplus_optimizer
from .quant import quantize_nf4

quiet.install()  # before any transformers model code imports torchao

__version__ = "0.1.0"

__all__ = [
    "PromptTuningConfig", "PTuningConfig", "PrefixTuningConfig", "PTuningV2Config",
    "AdapterConfig", "HoulsbyConfig", "PfeifferConfig",
    "AsyLoraConfig", "DoraConfig", "MoraConfig", "ReLoRA", "loraplus_optimizer",
    "METHODS", "AdapterFileError", "ConfigError", "DeltaConfig", "DeltaModel", "DeltatuneError", "LoraConfig",
    "MergeError", "TargetError", "__version__", "load", "save", "wrap",
    "quantize_nf4",
]
