"""OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", with its constrained variant
COFT; the Cayley-Neumann series from Qiu et al. 2025, "Orthogonal Finetuning Made Scalable"):
``y = W0 (R x) + b`` with ``R`` a learned block-diagonal orthogonal matrix (Cayley parametrisation), PEFT 0.21's
``OFTConfig`` semantics and file format (``peft_type "OFT"``, key ``<layer>.oft_R.weight``). Formulas: ``layer``."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ...config import check_positive, check_probability
from ...errors import ConfigError, TargetError
from ...layers import layer_kind, linear_features
from ..base import LayerDeltaConfig
from .layer import OFTLinear

INITS = ("zeros", "random")
# PEFT 0.18 changed the Cayley-Neumann series (the last term is no longer doubled); files say which one they use
# through ``peft_version``, so deltatune writes the first version with the series it computes
NEUMANN_FORMAT = "0.18.0"


def _older_than(version: Any, reference: str) -> bool:
    """Whether a PEFT version string (``"0.17.1"``, ``"0.18.0@abc"``, missing) is below ``reference``."""
    numbers = [int(part) for part in re.findall(r"\d+", str(version or "0").partition("@")[0])[:3]]
    return numbers < [int(part) for part in reference.split(".")]


def nearest_divisor(features: int, value: int) -> int:
    """PEFT's adjustment of an ``r`` / ``oft_block_size`` that does not divide ``features``: the closest divisor
    (the lower one on a tie); ``features`` itself when ``value`` exceeds it."""
    if value >= features:
        return features
    higher = value
    while higher <= features and features % higher:
        higher += 1
    lower = value
    while lower > 1 and features % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def resolve_blocks(features: int, r: int, block_size: int, path: str) -> tuple[int, int]:
    """(number of blocks, block size) for a layer with ``features`` inputs, from whichever of the two is set; a value
    that does not divide ``features`` is adjusted as PEFT does, with a warning."""
    given, name = (block_size, "oft_block_size") if r == 0 else (r, "r")
    value = given
    if features % given or given > features:
        value = nearest_divisor(features, given)
        warnings.warn(f"OFT {name}={given} does not divide in_features={features} of '{path}'; using {value}", stacklevel=4)
    return (features // value, value) if r == 0 else (value, features // value)


@dataclass
class OFTConfig(LayerDeltaConfig):
    """OFT: ``y = W0 (R x) + b``, ``R = block_diag(R_1, .., R_r)``, each ``R_j`` the Cayley transform of a learned
    skew-symmetric ``oft_block_size`` x ``oft_block_size`` matrix (PEFT's ``OFTConfig``, field for field).

    r / oft_block_size: number of blocks per layer / their size (``r * oft_block_size = in_features``); set exactly
      one, the other 0 (PEFT's default: oft_block_size=32, r=0); a value that does not divide a layer's in_features
      is adjusted per layer to the nearest divisor, with a warning (as PEFT);
    module_dropout: training only, that fraction of the blocks (rounded down) is randomly replaced by the identity;
    coft / eps: constrained OFT, each skew block kept within Frobenius norm eps / sqrt(#blocks);
    block_share: one block shared by all groups of input features;
    use_cayley_neumann / num_cayley_neumann_terms: the truncated Neumann series instead of the exact inverse;
    init: "zeros" (R = I, PEFT's init_weights=True) or "random" (N(0, 0.1) skew entries, init_weights=False);
    bias: "none" | "all" | "oft_only" (stored as deltatune's "lora_only": the biases of the adapted layers).
    Linear layers only (PEFT also adapts Conv2d and Embedding; deltatune refuses those with an error).
    """

    peft_type: ClassVar[str] = "OFT"
    bias_alias: ClassVar[str | None] = "oft_only"
    method: ClassVar[str] = "oft"
    peft_keys: ClassVar[dict[str, str]] = {
        **LayerDeltaConfig.peft_keys,
        "r": "r", "oft_block_size": "oft_block_size", "module_dropout": "module_dropout", "bias": "bias",
        "coft": "coft", "eps": "eps", "block_share": "block_share", "use_cayley_neumann": "use_cayley_neumann",
        "num_cayley_neumann_terms": "num_cayley_neumann_terms", "init": "init_weights",
    }
    peft_fixed: ClassVar[dict[str, Any]] = {"fan_in_fan_out": False}

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    init: str = "zeros"

    def validate(self) -> None:
        super().validate()
        for name in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (name == "num_cayley_neumann_terms"):
                bound = "a positive integer" if name == "num_cayley_neumann_terms" else "an integer >= 0"
                raise ConfigError(f"{name} must be {bound}, got {value!r}")
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(
                f"OFT needs exactly one of r (number of blocks) and oft_block_size set, the other 0 (got r={self.r}, "
                f"oft_block_size={self.oft_block_size}); e.g. oft_block_size=32, or r=4 with oft_block_size=0"
            )
        check_probability("module_dropout", self.module_dropout)
        check_positive("eps", self.eps)
        for name in ("coft", "block_share", "use_cayley_neumann"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be 'zeros' (R = I, PEFT's default) or 'random' (tests), got {self.init!r}")

    def to_peft_dict(self) -> dict[str, Any]:
        return dict(sorted({**super().to_peft_dict(), "peft_version": NEUMANN_FORMAT}.items()))

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LayerDeltaConfig:
        if data.get("use_cayley_neumann", False) and _older_than(data.get("peft_version"), NEUMANN_FORMAT):
            warnings.warn(
                f"this OFT adapter was written before PEFT {NEUMANN_FORMAT} (peft_version "
                f"{data.get('peft_version')!r}), whose Cayley-Neumann series differed slightly: its rotations are not "
                f"exactly those it was trained with; retrain it with PEFT >= {NEUMANN_FORMAT} or deltatune",
                stacklevel=3,
            )
        return super().from_peft_dict(data)

    @classmethod
    def encode(cls, name: str, value: Any) -> Any:
        if name == "init":
            return value == "zeros"
        return super().encode(name, value)

    @classmethod
    def decode(cls, name: str, value: Any) -> Any:
        if name == "init":
            if not isinstance(value, bool):
                raise ConfigError(f"init_weights must be true or false for OFT, got {value!r}")
            return "zeros" if value else "random"
        return value

    def create_delta(self, module: nn.Module, path: str) -> nn.Module:
        kind = layer_kind(module)
        if kind != "linear":
            raise TargetError(
                f"OFT in deltatune adapts nn.Linear layers only; '{path}' is {type(module).__name__} ({kind}). "
                f"Exclude it or target its Linear layers (PEFT's OFT also has Conv2d/Embedding, not transformers Conv1D)"
            )
        in_features, _ = linear_features(module)
        blocks, block_size = resolve_blocks(in_features, self.r, self.oft_block_size, path)
        return OFTLinear(
            in_features, blocks, block_size, self.block_share, self.module_dropout, self.coft, self.eps,
            self.use_cayley_neumann, self.num_cayley_neumann_terms, self.init,
        )
