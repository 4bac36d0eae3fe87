"""deltatune: parameter-efficient fine-tuning for PyTorch models (LoRA family, prompts, prefixes, adapters)."""

from __future__ import annotations

from . import batching, combine, hotswap, kernels, quiet  # noqa: F401  (each installs its strategies or kernels)
from .config import DeltaConfig
from .errors import AdapterFileError, ConfigError, DeltatuneError, MergeError, TargetError
from .io import load, save
from .merge_checkpoint import merge_checkpoint
from .methods import *  # noqa: F403  (every registered config class, METHODS, config_from_peft_dict)
from .methods import __all__ as _method_names
from .model import DeltaModel, wrap
from .optim import ReLoRA, loraplus_optimizer
from .quant import quantize_nf4

quiet.install()  # before any transformers model code imports torchao

__version__ = "0.1.0"

__all__ = [
    *_method_names, "ReLoRA", "loraplus_optimizer", "AdapterFileError", "ConfigError", "DeltaConfig", "DeltaModel",
    "DeltatuneError", "MergeError", "TargetError", "__version__", "kernels", "load", "merge_checkpoint", "save", "wrap", "quantize_nf4",
]
