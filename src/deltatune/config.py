"""Base config of every method, and conversion to/from PEFT's ``adapter_config.json`` dictionaries."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError

# PEFT keys that only matter at PEFT's own init time or are bookkeeping: read silently, never acted on.
IGNORED_PEFT_KEYS = {
    "peft_type", "peft_version", "auto_mapping", "revision", "inference_mode", "base_model_name_or_path",
    "task_type", "megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config",
    "layers_pattern", "runtime_config", "qalora_group_size", "kasa_config", "lora_ga_config", "monteclora_config",
    "velora_config", "arrow_config", "ensure_weight_tying", "exclude_modules",
}


@dataclass
class DeltaConfig:
    """Fields every method shares: what to target and what else to train and save with the adapter.

    targets: list of module names (a module matches when its path equals the name or ends with ``.name``),
      a full-match regex string, or ``"all-linear"``; ``None`` uses the architecture's default.
    exclude: same forms as ``targets``; matching modules are removed.
    layers: keep only modules inside these block indices (``...layer.3.``, ``...layers.3.``, ``...h.3.``).
    modules_to_save: modules (same name rules) trained as full copies and saved with the adapter.
    """

    peft_type: ClassVar[str] = ""
    method: ClassVar[str] = ""
    per_layer: ClassVar[bool] = False  # adds a delta to each targeted layer (then ``targets`` are layers)
    mergeable: ClassVar[bool] = False
    unmergeable_reason: ClassVar[str] = "its delta is not a weight update"
    # our field name -> PEFT key name (subclasses extend)
    peft_keys: ClassVar[dict[str, str]] = {
        "targets": "target_modules",
        "exclude": "exclude_modules",
        "layers": "layers_to_transform",
        "layers_pattern": "layers_pattern",
        "modules_to_save": "modules_to_save",
        "base_model_name_or_path": "base_model_name_or_path",
        "task_type": "task_type",
    }
    # keys PEFT's loader expects with these values; a file with another value uses a feature we lack
    peft_fixed: ClassVar[dict[str, Any]] = {}
    # file layout: tensor keys are ``file_prefix + key``, except keys in ``file_root_keys`` (written as they are)
    file_prefix: ClassVar[str] = "base_model.model."
    file_root_keys: ClassVar[frozenset[str]] = frozenset()

    targets: list[str] | str | None = None
    exclude: list[str] | str | None = None
    layers: list[int] | None = None
    layers_pattern: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown keys read from a file

    def __post_init__(self) -> None:
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` for values that cannot work."""
        for f in dataclasses.fields(self):
            # unknown keys read from a file are ignored, never used; a field with metadata {"unbounded": True} is not
            # a size (a seed such as VeRA's projection_prng_key) and is checked by its class instead
            if f.name != "extra" and not f.metadata.get("unbounded", False):
                check_bounded(f.name, getattr(self, f.name))
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and not _is_str_list(value):
                raise ConfigError(f"{name} must be a list of module names, a regex string or 'all-linear', got {value!r}")
        if self.layers is not None and not (
            isinstance(self.layers, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)
        ):
            raise ConfigError(f"layers must be a list of block indices (ints >= 0), got {self.layers!r}")
        if self.modules_to_save is not None and not _is_str_list(self.modules_to_save):
            raise ConfigError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        if self.layers_pattern is not None and not isinstance(self.layers_pattern, str) and not _is_str_list(self.layers_pattern):
            raise ConfigError(f"layers_pattern must be a name or list of names, got {self.layers_pattern!r}")

    # ---- PEFT dictionaries -------------------------------------------------------------------------------------
    @classmethod
    def accepts(cls, peft_dict: dict[str, Any]) -> bool:
        """Whether a PEFT dictionary with this class's ``peft_type`` describes this method."""
        return True

    def to_peft_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.peft_fixed)
        for ours, theirs in self.peft_keys.items():
            value = getattr(self, ours)
            out[theirs] = self.encode(ours, value)
        out["peft_type"] = self.peft_type
        return dict(sorted(out.items()))

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> DeltaConfig:
        reverse = {theirs: ours for ours, theirs in cls.peft_keys.items()}
        kwargs: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in data.items():
            if key in reverse:
                kwargs[reverse[key]] = cls.decode(reverse[key], value)
            elif key in cls.peft_fixed:
                if value != cls.peft_fixed[key] and value not in (None, {}, [], False):
                    raise ConfigError(
                        f"adapter config sets {key}={value!r}, a PEFT feature deltatune does not support; "
                        f"re-train or convert the adapter without it"
                    )
            elif key not in IGNORED_PEFT_KEYS:
                unknown.append(key)
        if unknown:
            warnings.warn(f"ignoring unknown adapter config keys: {', '.join(sorted(unknown))}", stacklevel=3)
        field_names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in kwargs.items() if k in field_names})
        except (TypeError, ValueError) as error:
            if isinstance(error, ConfigError):
                raise
            raise ConfigError(f"invalid {cls.peft_type} adapter config: {error}") from error

    @classmethod
    def encode(cls, name: str, value: Any) -> Any:
        """Our value -> PEFT's JSON value for one field."""
        return value

    @classmethod
    def decode(cls, name: str, value: Any) -> Any:
        """PEFT's JSON value -> our value for one field."""
        return value

    # ---- files ---------------------------------------------------------------------------------------------------
    def export_for_save(self, model: Any, name: str, data: dict, tensors: dict) -> tuple[dict, dict]:
        """The config dictionary and tensors to write for adapter ``name`` (as they are; PiSSA converts)."""
        return data, tensors

    def replace(self, **changes: Any) -> DeltaConfig:
        return dataclasses.replace(self, **changes)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# A config asks for sizes (ranks, token counts, bottlenecks) that are allocated before any tensor is read; no real
# adapter needs a size above this, and r = 10**6 on one 4096-wide layer alone would already need ~36 GB.
MAX_SIZE = 2**20
MAX_DEPTH = 32  # nesting of lists/dicts inside one config value (deeper is an attack or a corrupt file)


def check_bounded(name: str, value: Any, depth: int = 0) -> None:
    """Refuse NaN/inf floats, integers above ``MAX_SIZE`` and nesting deeper than ``MAX_DEPTH`` anywhere in a
    config value, naming the field (``alpha``, ``rank_pattern['query']``)."""
    if depth > MAX_DEPTH:
        raise ConfigError(f"{name} is nested more than {MAX_DEPTH} levels deep; a config value is a flat list or mapping")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if isinstance(value, int) and abs(value) > MAX_SIZE:
        raise ConfigError(f"{name} = {value} is larger than any adapter needs (limit {MAX_SIZE:,}); use a smaller value")
    if isinstance(value, dict):
        for key, item in value.items():
            check_bounded(f"{name}[{key!r}]", item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_bounded(f"{name}[{i}]", item, depth + 1)


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """``ConfigError`` unless ``value`` is a finite number (not a bool) > 0, or >= 0 with ``allow_zero``."""
    if (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
        or (value == 0 and not allow_zero)
    ):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a number {bound}, got {value!r}")


def check_probability(name: str, value: float) -> None:
    """``ConfigError`` unless ``value`` is a number in [0, 1) (a dropout rate)."""
    check_positive(name, value, allow_zero=True)
    if value >= 1:
        raise ConfigError(f"{name} must be < 1, got {value}")


def check_positive_int(name: str, value: int) -> None:
    """``ConfigError`` unless ``value`` is an int (not a bool) >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
