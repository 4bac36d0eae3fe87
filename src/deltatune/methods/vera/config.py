"""``VeraConfig``: fields, validation, the PEFT ``adapter_config.json`` mapping, and injection (which builds the one
pair of projections the adapter's layers share before it creates their deltas)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from ...config import check_positive_int, check_probability
from ...dtypes import adapter_dtype
from ...errors import ConfigError, TargetError
from ...filling import place
from ...layers import DeltaLayer, layer_kind, linear_features
from ..base import LayerDeltaConfig
from .layer import PROJECTION_KEYS, VERA_INITS, VeraLinear, VeraProjections

if TYPE_CHECKING:
    from ...model import DeltaModel

_INIT_TO_PEFT = {"vera": True, "random": False}
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass
class VeraConfig(LayerDeltaConfig):
    """VeRA: ``y = W0 x + lambda_b * (B_s (lambda_d * (A_s drop(x))))`` on Linear and Conv1D layers.

    r: rows of the shared A (columns of B); unlike LoRA it may exceed the layer sizes (the paper uses r = 1024 on
      768-wide layers): the cost is one shared [r, in_max] + [out_max, r] pair, plus r + out trainable values a layer;
    projection_prng_key: seed of the shared projections (PEFT draws the same numbers from it);
    save_projection: write the projections into the adapter file (else they are re-drawn from the key on load);
    dropout on the VeRA input; d_initial: the initial value of every lambda_d entry (lambda_b starts at 0);
    init: "vera" (the paper's init), "random" (PEFT's init_weights=False: lambda_b = 1, lambda_d ~ N(0, 1));
    fan_in_fan_out: detected per layer (True for transformers' Conv1D); written to files for PEFT;
    bias: "none" | "all" | "lora_only" (PEFT's "vera_only", accepted too).
    """

    peft_type: ClassVar[str] = "VERA"
    bias_alias: ClassVar[str | None] = "vera_only"
    method: ClassVar[str] = "vera"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d_t")
    peft_keys: ClassVar[dict[str, str]] = {
        **LayerDeltaConfig.peft_keys,
        "r": "r", "projection_prng_key": "projection_prng_key", "save_projection": "save_projection",
        "dropout": "vera_dropout", "d_initial": "d_initial", "init": "init_weights", "fan_in_fan_out": "fan_in_fan_out",
        "bias": "bias",
    }
    file_root_keys: ClassVar[frozenset[str]] = frozenset(PROJECTION_KEYS.values())

    r: int = 256
    projection_prng_key: int = field(default=0, metadata={"unbounded": True})  # a seed, not a size
    save_projection: bool = True
    dropout: float = 0.0
    d_initial: float = 0.1
    init: str = "vera"
    fan_in_fan_out: bool | None = None

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        key = self.projection_prng_key
        if isinstance(key, bool) or not isinstance(key, int) or not _SEED_RANGE[0] <= key <= _SEED_RANGE[1]:
            raise ConfigError(f"projection_prng_key must be an integer seed (64-bit), got {key!r}")
        if not isinstance(self.save_projection, bool):
            raise ConfigError(f"save_projection must be true or false, got {self.save_projection!r}")
        check_probability("dropout", self.dropout)
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)):
            raise ConfigError(f"d_initial must be a number, got {self.d_initial!r}")
        if self.init not in VERA_INITS:
            raise ConfigError(f"init must be one of {list(VERA_INITS)}, got {self.init!r}")

    @classmethod
    def encode(cls, name: str, value: Any) -> Any:
        if name == "init":
            return _INIT_TO_PEFT[value]
        if name == "fan_in_fan_out":
            return bool(value)
        return super().encode(name, value)

    @classmethod
    def decode(cls, name: str, value: Any) -> Any:
        if name == "init":
            return {True: "vera", False: "random"}.get(value, value) if isinstance(value, bool) else value
        if name == "fan_in_fan_out":
            return None  # detected per layer from its type; the file value only informs PEFT
        return value

    def inject(self, model: DeltaModel, name: str, paths: list[str]) -> None:
        """Draw the adapter's projections, sized to the largest targeted layer, then give each layer in ``paths`` a
        ``VeraLinear`` that holds them (not ``LayerDeltaConfig.inject``: its deltas are independent, and it bounds
        r by the layer size, which VeRA's shared projections need not respect)."""
        hosts = [model.host_at(path, DeltaLayer) for path in paths]
        for path, host in zip(paths, hosts):
            if layer_kind(host.base_layer) not in self.supported_kinds:
                raise TargetError(f"VeRA supports Linear and Conv1D layers; '{path}' is {type(host.base_layer).__name__}")
        if not hosts:
            raise TargetError("VeRA needs at least one targeted Linear or Conv1D layer; check targets")
        features = [linear_features(host.base_layer) for host in hosts]
        in_max, out_max = max(f[0] for f in features), max(f[1] for f in features)
        check_vera_rank(self.r, in_max, out_max)
        projections = VeraProjections(self.r, in_max, out_max, self.projection_prng_key, self.save_projection)
        for host, (in_features, out_features) in zip(hosts, features):
            fan_in_fan_out = layer_kind(host.base_layer) == "conv1d_t"
            delta = VeraLinear(
                in_features, out_features, projections, self.dropout, self.d_initial, self.init, fan_in_fan_out
            )
            host.adapters[name] = place(delta, **_placement(host.base_layer))


def check_vera_rank(r: int, in_max: int, out_max: int) -> None:
    """Refuse, before allocating, an r above ``max(1024, 4 * largest layer size)``: r may exceed the layer sizes
    (the paper uses up to 1.33x), but the shared pair costs ``r * (in_max + out_max)`` floats, so without a bound a
    small file with save_projection=false could make the loader allocate gigabytes."""
    limit = max(1024, 4 * max(in_max, out_max))
    if r > limit:
        megabytes = r * (in_max + out_max) * 4 / 2**20
        raise TargetError(
            f"VeRA r = {r} is far above the targeted layers' largest size {max(in_max, out_max)}: the shared "
            f"projections would take {megabytes:,.0f} MB; use r <= {limit} (max(1024, 4 x the largest layer size))"
        )


def _placement(module: nn.Module) -> dict[str, Any]:
    """Device of the base weight; float32 for half-precision, quantized or integer bases (as other deltas)."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return {"device": None, "dtype": None}
    return {"device": weight.device, "dtype": adapter_dtype(weight.dtype)}
