"""IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
arXiv 2205.05638): learned per-feature scaling vectors ``l``, initialised to ones.

On attention targets (keys, values) the layer output is scaled, ``y = l * (W x + b)``; on ``feedforward`` targets
(the FFN down-projection) the input is, ``y = W (l * x) + b``. Mergeable: ``W' = diag(l) W, b' = l * b`` /
``W' = W diag(l)``. Files: PEFT layout, ``peft_type "IA3"``, key ``<path>.ia3_l``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ...errors import ConfigError, TargetError
from ...layers import layer_kind, linear_features
from ..base import LayerDeltaConfig
from .layer import IA3Delta, IA3Input, IA3Output

# transformers model_type -> (targets, feedforward targets), as PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
# and TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
IA3_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "t5": (["k", "v", "wo"], ["wo"]), "mt5": (["k", "v", "wi_1"], []),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]), "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]), "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]), "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "RefinedWeb": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "RefinedWebModel": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]), "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "llama4": (["q_proj", "v_proj", "down_proj"], ["down_proj"]), "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]), "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]), "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
}


def architecture_defaults(model: nn.Module, what: str) -> list[str]:
    """The model type's default IA3 ``targets`` or ``feedforward`` list (PEFT's tables); an unknown type is an error."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in IA3_DEFAULTS:
        raise TargetError(
            f"IA3 has no default {what} for model type {model_type or type(model).__name__}; pass "
            f"{what}=[...] (module names{', or [] for none' if what == 'feedforward' else ''})"
        )
    targets, feedforward = IA3_DEFAULTS[model_type]
    return list(targets if what == "targets" else feedforward)


def is_feedforward(path: str, spec: list[str] | str | None) -> bool:
    """PEFT's rule: a regex string must match the whole path; a list entry matches the end of the path (plain
    ``str.endswith``, without a dot boundary, exactly as PEFT tests it)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path.endswith(name) for name in spec)


@dataclass
class IA3Config(LayerDeltaConfig):
    """IA3: per-feature scaling vectors ``l`` (ones at init) on every target.

    feedforward: targets whose *input* is scaled (``y = W (l * x) + b``; the others: ``y = l * (W x + b)``), by
      PEFT's rule (a regex matching the whole path, or names matching the end of the path); a list must be a subset
      of a ``targets`` list. None: the architecture's default (PEFT's table), e.g. ``down_proj`` for Llama.
    init_weights: True sets ``l`` to ones (the identity, PEFT's default); False draws it from N(0, 1) (PEFT's
      ``init_ia3_weights=False``).
    fan_in_fan_out: detected per layer (True for transformers' Conv1D); the field exists for PEFT files.
    ``layers`` (PEFT's IA3 has no ``layers_to_transform``) and ``bias`` are not supported: use targets / a regex.
    """

    peft_type: ClassVar[str] = "IA3"
    method: ClassVar[str] = "ia3"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d_t", "conv")
    peft_keys: ClassVar[dict[str, str]] = {
        **{k: v for k, v in LayerDeltaConfig.peft_keys.items() if k not in ("layers", "layers_pattern")},
        "feedforward": "feedforward_modules", "fan_in_fan_out": "fan_in_fan_out", "init_weights": "init_ia3_weights",
    }
    # features other PEFT tuners have and IA3 lacks: a file setting them is refused, never half-applied
    peft_fixed: ClassVar[dict[str, Any]] = {"layers_to_transform": None, "layers_pattern": None}

    feedforward: list[str] | str | None = None
    fan_in_fan_out: bool | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.feedforward, (tuple, set)):
            self.feedforward = sorted(self.feedforward)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.bias != "none":
            raise ConfigError(f"IA3 trains no biases (PEFT's IA3 has no bias option); got bias={self.bias!r}")
        if self.layers is not None or self.layers_pattern is not None:
            raise ConfigError("IA3 has no layers=... (PEFT's IA3 has no layers_to_transform); choose blocks with a "
                              "targets regex instead, e.g. '.*layers\\.(0|1)\\..*(k_proj|v_proj)'")
        spec = self.feedforward
        if spec is not None and not isinstance(spec, str) and not (
            isinstance(spec, list) and all(isinstance(s, str) for s in spec)
        ):
            raise ConfigError(f"feedforward must be a list of module names, a regex string or None, got {spec!r}")
        if isinstance(spec, str):
            try:
                re.compile(spec)
            except re.error as error:
                raise ConfigError(f"feedforward regex {spec!r} is invalid: {error}") from error
        if isinstance(spec, list) and isinstance(self.targets, list) and not set(spec) <= set(self.targets):
            extra = sorted(set(spec) - set(self.targets))
            raise ConfigError(f"feedforward must be a subset of targets (as in PEFT); {extra} are not in targets "
                              f"{self.targets}: add them to targets or drop them from feedforward")
        for name in ("init_weights", "fan_in_fan_out"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name == "fan_in_fan_out"):
                raise ConfigError(f"{name} must be true or false, got {value!r}")

    def to_peft_dict(self) -> dict[str, Any]:
        """PEFT's dictionary, without the refused-feature keys (PEFT's IA3Config has no such fields)."""
        return {k: v for k, v in super().to_peft_dict().items() if k not in self.peft_fixed}

    @classmethod
    def encode(cls, name: str, value: Any) -> Any:
        return bool(value) if name == "fan_in_fan_out" else value

    @classmethod
    def decode(cls, name: str, value: Any) -> Any:
        if name == "fan_in_fan_out":
            return None  # always detected per layer from its type; the file value only informs PEFT
        return value

    def default_targets(self, model: nn.Module) -> list[str] | str:
        return architecture_defaults(model, "targets")

    def inject(self, model: Any, name: str, paths: list[str]) -> None:
        """Resolve ``feedforward=None`` to the architecture's default, then add a delta per layer."""
        resolved = self
        if self.feedforward is None:
            resolved = copy.copy(self)  # no re-validation: PEFT checks the subset rule only for lists the user gave
            resolved.feedforward = architecture_defaults(model.model, "feedforward")
        LayerDeltaConfig.inject(resolved, model, name, paths)

    def create_delta(self, module: nn.Module, path: str) -> nn.Module:
        kind = layer_kind(module)
        feedforward = is_feedforward(path, self.feedforward)
        cls = IA3Input if feedforward else IA3Output
        if kind in ("linear", "conv1d_t"):
            in_features, out_features = linear_features(module)
            return cls(in_features if feedforward else out_features, kind, self.init_weights)
        if kind == "conv" and isinstance(module, (nn.Conv2d, nn.Conv3d)):
            channels = module.in_channels if feedforward else module.out_channels
            return cls(channels, kind, self.init_weights, module.weight.dim() - 2, module.groups)
        raise TargetError(f"IA3 supports Linear, transformers Conv1D, Conv2d and Conv3d (as PEFT); '{path}' is "
                          f"{type(module).__name__}")

    def export_for_save(self, model: Any, name: str, data: dict, tensors: dict) -> tuple[dict, dict]:
        """Write ``feedforward_modules`` resolved, so PEFT scales exactly the layers deltatune scaled: the
        architecture's default names when PEFT accepts them (a subset of a targets list), else a regex matching the
        exact feedforward paths ([] when there are none)."""
        if self.feedforward is not None:
            return data, tensors
        scaled_inputs = sorted(
            path for path, host in model.hosts() if isinstance(_delta_of(host, name), IA3Delta) and host.adapters[name].transforms_input
        )
        defaults = architecture_defaults(model.model, "feedforward")
        targets = data.get("target_modules")
        if isinstance(targets, str) or set(defaults) <= set(targets or []):
            data["feedforward_modules"] = defaults
        else:
            data["feedforward_modules"] = "|".join(map(re.escape, scaled_inputs)) if scaled_inputs else []
        return data, tensors


def _delta_of(host: nn.Module, name: str) -> nn.Module | None:
    """Adapter ``name``'s delta in a layer host (None for other hosts or when the layer lacks it)."""
    adapters = getattr(host, "adapters", None)
    return adapters[name] if isinstance(adapters, nn.ModuleDict) and name in adapters else None
