"""Shared machinery of weight-delta methods: a config that injects ``DeltaLayer`` hosts, and mergeable deltas."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..config import DeltaConfig
from ..dtypes import adapter_dtype
from ..errors import ConfigError, MergeError, TargetError
from ..filling import place
from ..layers import DeltaLayer, layer_kind, linear_features
from ..protocol import Delta
from ..targets import default_targets

if TYPE_CHECKING:
    from ..model import DeltaModel


@dataclass
class LayerDeltaConfig(DeltaConfig):
    """A method that adds a delta module to each targeted layer (LoRA and its family).

    bias: "none" | "all" (every bias in the model trains and is saved) | "lora_only" (biases of targeted layers).
    rank_is_tensor_dim: whether ``r`` is a dimension the delta's tensors are allocated with, so an r above the
      layer's size is refused before allocating (``check_rank``) and a file's r must appear among its tensors' dims
      (``deltatune.io``). False for a method whose tensors are bounded by the layer's size whatever r is (LoKr: r only
      chooses between full and factored matrices, and a large r is its "full matrix" mode).
    """

    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d_t", "embedding", "conv")
    per_layer: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    rank_is_tensor_dim: ClassVar[bool] = True

    bias_alias: ClassVar[str | None] = None  # the method's PEFT name for "lora_only" ("oft_only"): read and written

    bias: str = "none"

    def __post_init__(self) -> None:
        if self.bias_alias is not None and self.bias == self.bias_alias:
            self.bias = "lora_only"
        super().__post_init__()

    @classmethod
    def encode(cls, name: str, value: Any) -> Any:
        if name == "bias" and value == "lora_only" and cls.bias_alias is not None:
            return cls.bias_alias
        return super().encode(name, value)

    def validate(self) -> None:
        super().validate()
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")

    def is_supported(self, module: nn.Module) -> bool:
        return layer_kind(module) in self.supported_kinds

    def default_targets(self, model: nn.Module) -> list[str] | str:
        """Targets used when ``targets`` is None: this method's usual choice for the model's architecture."""
        return default_targets(model)

    def create_delta(self, module: nn.Module, path: str) -> nn.Module:
        """The delta module for one targeted layer (``module`` is the unwrapped base layer)."""
        raise NotImplementedError

    def inject(self, model: DeltaModel, name: str, paths: list[str]) -> None:
        """Add this adapter's delta to each layer in ``paths`` (wrapping plain layers in a ``DeltaLayer``)."""
        for path in paths:
            host = model.host_at(path, DeltaLayer)
            check_rank(self, host.base_layer, path)
            delta = self.create_delta(host.base_layer, path)
            weight = getattr(host.base_layer, "weight", None)
            if weight is not None:
                place(delta, weight.device, adapter_dtype(weight.dtype))
            host.adapters[name] = delta


class MergeableDelta(Delta):
    """A delta whose effect is a weight update ``dW``: merge adds it (in float32), unmerge subtracts it."""

    mergeable = True

    def delta_weight(self, layer: DeltaLayer) -> torch.Tensor:
        """``dW`` in the layout of ``layer.weight`` (float32)."""
        raise NotImplementedError

    def merge_into(self, layer: DeltaLayer, safe: bool = True) -> None:
        weight = layer.weight_for_merge
        merged = self.merged_weight(layer)
        if safe and not torch.isfinite(merged).all():
            raise MergeError(f"merging {type(self).__name__} would put NaN/inf into the weights; nothing was changed")
        weight.data.copy_(merged.to(weight.dtype))

    def unmerge_from(self, layer: DeltaLayer) -> None:
        weight = layer.weight_for_merge
        weight.data.copy_((weight.detach().float() - self.delta_weight(layer).to(weight.device)).to(weight.dtype))


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern rule: the first key that matches the end of the module path wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def check_patterns(rank_pattern: Any, alpha_pattern: Any) -> None:
    """``rank_pattern`` maps module-name regexes to positive ints, ``alpha_pattern`` to positive numbers."""
    for name, pattern, check in (
        ("rank_pattern", rank_pattern, lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
        ("alpha_pattern", alpha_pattern, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0),
    ):
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and check(v) for k, v in pattern.items()):
            raise ConfigError(f"{name} must map module-name regexes to positive numbers, got {pattern!r}")
        for key in pattern:
            try:
                re.compile(key)
            except re.error as error:
                raise ConfigError(f"{name} key {key!r} is not a valid regex: {error}") from error


def frozen(tensor_owner: Any) -> Any:
    """Mark a parameter (or every parameter of a module) as never trainable, e.g. AsyLoRA's fixed A."""
    params = tensor_owner.parameters() if isinstance(tensor_owner, nn.Module) else [tensor_owner]
    for parameter in params:
        parameter.requires_grad_(False)
        parameter._deltatune_frozen = True  # type: ignore[attr-defined]
    return tensor_owner


def check_rank(config: DeltaConfig, module: nn.Module, path: str) -> None:
    """Refuse, before allocating, a rank above the layer's largest dimension: ``B A`` has rank <= min(in, out), so
    such an r only adds memory (r = 10**6 on a 384-wide layer would allocate gigabytes)."""
    r = getattr(config, "r", None)
    if not isinstance(r, int) or not getattr(config, "rank_is_tensor_dim", True):
        return
    r = pattern_value(getattr(config, "rank_pattern", None) or {}, path, r)
    kind = layer_kind(module)
    weight = getattr(module, "weight", None)
    dims = linear_features(module) if kind in ("linear", "conv1d_t") else tuple(getattr(weight, "shape", ()))
    if dims and r > max(dims):
        raise TargetError(
            f"r = {r} for '{path}' is larger than the layer itself {tuple(dims)}; B A has rank <= min(in, out) = "
            f"{min(dims)}, so a larger r only costs memory: use r <= in_features and out_features (here {min(dims)})"
        )
