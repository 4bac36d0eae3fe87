"""Configs of the LyCORIS methods LoHa and LoKr, with HF PEFT's fields, defaults and ``adapter_config.json`` keys.

Both are additive weight deltas on Linear, Conv1d and Conv2d layers, ``y = W0 x + op(x, dW)`` (``op`` is the layer's
own linear map or convolution with ``dW`` as weight), with ``s = alpha / r``:

* LoHa: ``dW = ((w1a @ w1b) * (w2a @ w2b)) * s`` (Hadamard product of two rank-r products);
* LoKr: ``dW = kron(w1, w2) * s`` with the layer's dims factored as PEFT does (``factorization``); each factor full
  or a rank-r product, as PEFT decides from r, the factor sizes and ``decompose_both``.

PEFT has no input dropout here: ``rank_dropout`` zeroes whole output rows of ``dW`` and ``module_dropout`` skips the
delta for a whole step, both in training only. ``use_effective_conv2d`` (PEFT's CP decomposition of conv kernels,
tensors ``hada_t1``/``lokr_t2``) is refused for convolutions whose kernel is larger than 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ...config import check_positive, check_positive_int
from ...errors import ConfigError, TargetError
from ...layers import layer_kind, linear_features
from ..base import LayerDeltaConfig, check_patterns, pattern_value
from .layer import LoHaDelta, LoKrDelta, conv_shape, factorization

_INIT_TO_PEFT: dict[str, Any] = {"kaiming": True, "random": False, "lycoris": "lycoris"}


@dataclass
class LycoConfig(LayerDeltaConfig):
    """Fields LoHa and LoKr share (PEFT's ``LycorisConfig``).

    r: rank; alpha: s = alpha / r; rank_dropout: probability of zeroing an output row of dW (training only);
    module_dropout: probability of skipping the delta for a step (training only);
    init: "kaiming" (PEFT's default init_weights=True: dW = 0 at init), "random" (PEFT init_weights=False: every
      factor random, dW != 0);
    use_effective_conv2d: PEFT's CP decomposition for convolutions with kernel > 1 (not supported: refused there);
    rank_pattern / alpha_pattern: per-module overrides, keys are regexes matched against the end of the path.
    """

    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv", "conv1d_t")  # conv1d_t: refused with a reason
    peft_keys: ClassVar[dict[str, str]] = {
        **LayerDeltaConfig.peft_keys,
        "r": "r", "alpha": "alpha", "rank_dropout": "rank_dropout", "module_dropout": "module_dropout",
        "init": "init_weights", "use_effective_conv2d": "use_effective_conv2d",
        "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern",
    }
    inits: ClassVar[tuple[str, ...]] = ("kaiming", "random")

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    init: str = "kaiming"
    use_effective_conv2d: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        check_positive("alpha", self.alpha)
        for name in ("rank_dropout", "module_dropout"):
            value = getattr(self, name)
            check_positive(name, value, allow_zero=True)
            if value >= 1:
                raise ConfigError(f"{name} must be < 1, got {value}")
        if self.bias != "none":
            raise ConfigError(f"bias={self.bias!r}: PEFT's {self.peft_type} trains no biases; use bias='none'")
        if not isinstance(self.init, str) or self.init not in self.inits:
            raise ConfigError(f"init must be one of {list(self.inits)}, got {self.init!r}")
        if not isinstance(self.use_effective_conv2d, bool):
            raise ConfigError(f"use_effective_conv2d must be true or false, got {self.use_effective_conv2d!r}")
        check_patterns(self.rank_pattern, self.alpha_pattern)

    @classmethod
    def encode(cls, name: str, value: Any) -> Any:
        return _INIT_TO_PEFT.get(value, value) if name == "init" else value

    @classmethod
    def decode(cls, name: str, value: Any) -> Any:
        if name == "init":
            return {True: "kaiming", False: "random"}.get(value, value) if isinstance(value, bool) else str(value).lower()
        return value

    def rank_and_scaling(self, path: str) -> tuple[int, float]:
        r = pattern_value(self.rank_pattern, path, self.r)
        return r, pattern_value(self.alpha_pattern, path, self.alpha) / r

    def layer_shape(self, module: nn.Module, path: str) -> tuple[tuple[int, ...], dict[str, Any] | None]:
        """``(shape of layer.weight, conv settings or None)``, refusing layers PEFT's LyCORIS layers do not take."""
        kind = layer_kind(module)
        if kind == "linear":
            in_features, out_features = linear_features(module)
            return (out_features, in_features), None
        if kind == "conv" and isinstance(module, (nn.Conv1d, nn.Conv2d)):
            effective = self.use_effective_conv2d and any(k != 1 for k in module.kernel_size)
            if effective:
                raise TargetError(
                    f"use_effective_conv2d=True on '{path}' (kernel {tuple(module.kernel_size)}): PEFT's CP "
                    f"decomposition of conv kernels is not supported by deltatune; use use_effective_conv2d=False"
                )
            return conv_shape(module, path)
        raise TargetError(
            f"{self.peft_type} adapts nn.Linear, nn.Conv1d and nn.Conv2d layers (as PEFT does); '{path}' is "
            f"{type(module).__name__}: exclude it or target other modules"
        )


@dataclass
class LoHaConfig(LycoConfig):
    """LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): ``dW = ((w1a @ w1b) * (w2a @ w2b)) * alpha / r``.

    Tensors per layer (PEFT names): hada_w1_a, hada_w2_a [out, r]; hada_w1_b, hada_w2_b [r, in * kernel].
    init "kaiming": w1a, w1b, w2a kaiming-uniform, w2b zero (dW = 0), as PEFT.
    """

    peft_type: ClassVar[str] = "LOHA"
    method: ClassVar[str] = "loha"

    def create_delta(self, module: nn.Module, path: str) -> nn.Module:
        shape, conv = self.layer_shape(module, path)
        r, scaling = self.rank_and_scaling(path)
        return LoHaDelta(shape, conv, r, scaling, self.rank_dropout, self.module_dropout, self.init)


@dataclass
class LoKrConfig(LycoConfig):
    """LoKr (Yeh et al. 2023, LyCORIS): ``dW = kron(w1, w2) * alpha / r``.

    out = a * b and in = c * d with ``(a, b) = factorization(out, decompose_factor)``, ``(c, d) = factorization(in,
    decompose_factor)``; w1 [a, c] is full (lokr_w1) unless ``decompose_both`` and ``r < max(a, c) / 2``
    (then lokr_w1_a [a, r] @ lokr_w1_b [r, c]); w2 [b, d * kernel] is full (lokr_w2) when ``r >= max(b, d) / 2``,
    else lokr_w2_a [b, r] @ lokr_w2_b [r, d * kernel]. ``rank_dropout_scale``: divide the kept rows by their mean.
    init "kaiming" (PEFT's default): w1 (or w1_a) zero, the rest kaiming-uniform (dW = 0); "lycoris": w2 (or w2_b)
    zero, the rest kaiming-uniform, as the LyCORIS repository does.
    Because r only picks between full and factored matrices, the tensors never outgrow the layer whatever r is.
    """

    peft_type: ClassVar[str] = "LOKR"
    method: ClassVar[str] = "lokr"
    peft_keys: ClassVar[dict[str, str]] = {
        **LycoConfig.peft_keys,
        "decompose_both": "decompose_both", "decompose_factor": "decompose_factor",
        "rank_dropout_scale": "rank_dropout_scale",
    }
    inits: ClassVar[tuple[str, ...]] = ("kaiming", "random", "lycoris")
    rank_is_tensor_dim: ClassVar[bool] = False

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def validate(self) -> None:
        super().validate()
        for name in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or (factor <= 0 and factor != -1):
            raise ConfigError(f"decompose_factor must be -1 (factors near the square root) or a positive integer, got {factor!r}")

    def create_delta(self, module: nn.Module, path: str) -> nn.Module:
        shape, conv = self.layer_shape(module, path)
        r, scaling = self.rank_and_scaling(path)
        out_l, out_k = factorization(shape[0], self.decompose_factor)
        in_m, in_n = factorization(shape[1], self.decompose_factor)
        full_w1 = not (self.decompose_both and r < max(out_l, in_m) / 2)
        full_w2 = r >= max(out_k, in_n) / 2
        return LoKrDelta(
            shape, conv, r, scaling, self.rank_dropout, self.module_dropout, self.init, ((out_l, out_k), (in_m, in_n)),
            full_w1, full_w2, self.rank_dropout_scale,
        )


def lokr_parameter_count(out_features: int, in_features: int, r: int, decompose_both: bool = False, factor: int = -1) -> int:
    """Parameters of LoKr on one Linear layer (PEFT's rule), e.g. to compare with LoRA's ``r * (in + out)``."""
    (a, b), (c, d) = factorization(out_features, factor), factorization(in_features, factor)
    w1 = r * (a + c) if decompose_both and r < max(a, c) / 2 else a * c
    w2 = b * d if r >= max(b, d) / 2 else r * (b + d)
    return w1 + w2

