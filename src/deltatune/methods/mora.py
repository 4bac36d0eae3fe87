"""MoRA (Jiang et al. 2024, "MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning", arXiv 2405.12130).

``y = W0 x + decompress(M compress(drop(x)))`` with one trainable square M [r_hat, r_hat], zero-initialised,
``r_hat = round(sqrt((in + out) * r))`` (rounded down to even for type 6) so M has as many parameters as a
rank-r LoRA (exactly when ``(in + out) * r`` is a square). Compression and decompression have no parameters.
The input is padded cyclically (``x[:pad]`` appended) when ``in % r_hat != 0``.

- compress "cyclic": feature j goes to group ``j mod r_hat`` (summed); "contiguous": feature j goes to group
  ``j // ceil(in / r_hat)``.
- decompress "tile": output i reads ``z[i mod r_hat]``; "interleave": output i reads ``z[i // ceil(out / r_hat)]``.
- type 1 (sharing) = cyclic + tile; type 2 = contiguous + interleave; type 3 = contiguous + tile;
  type 4 = cyclic + interleave.
- type 6 (RoPE): split the padded input into n chunks of r_hat, rotate chunk i as RoPE does at position i
  (``c cos_i + rotate_half(c) sin_i``, base 10000), apply M to every chunk, concatenate, truncate to ``out``
  (tile first when ``n * r_hat < out``).
Default type: 6 for r < 64, 1 otherwise (the authors use type 6 for small ranks, type 1 for large ones).
Merging uses the exact equivalent ``dW`` obtained by running the (linear) delta on the identity matrix: one
batched pass, no Python loop over rows. Files: PEFT layout, key ``<path>.mora_M.weight``, ``peft_type "MORA"``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import check_positive_int, check_probability
from ..errors import ConfigError, TargetError
from ..layers import DeltaLayer, layer_kind, linear_features
from ..protocol import Delta, RowIndex, RowStacker, dropout_module, initialising, stack_slots
from .base import LayerDeltaConfig, MergeableDelta
from .lora import pattern_value

MORA_TYPES = (1, 2, 3, 4, 6)
_PLAN = {1: ("cyclic", "tile"), 2: ("contiguous", "interleave"), 3: ("contiguous", "tile"), 4: ("cyclic", "interleave")}


def mora_rank(in_features: int, out_features: int, r: int, mora_type: int) -> int:
    """``r_hat = round(sqrt((in + out) * r))``, even for type 6, at least 2 (type 6) or 1."""
    r_hat = round(math.sqrt((in_features + out_features) * r))
    if mora_type == 6:
        r_hat = max(2, r_hat // 2 * 2)
    return max(1, r_hat)


@dataclass
class MoraConfig(LayerDeltaConfig):
    """MoRA: r is the LoRA rank whose parameter budget M matches; mora_type in {1, 2, 3, 4, 6} or None (auto)."""

    peft_type: ClassVar[str] = "MORA"
    method: ClassVar[str] = "mora"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d_t")
    peft_keys: ClassVar[dict[str, str]] = {
        **LayerDeltaConfig.peft_keys,
        "r": "r", "mora_type": "mora_type", "dropout": "lora_dropout", "bias": "bias", "init": "init_lora_weights",
        "rank_pattern": "rank_pattern",
    }

    r: int = 8
    mora_type: int | None = None
    dropout: float = 0.0
    init: str = "zeros"
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        if self.mora_type is not None and self.mora_type not in MORA_TYPES:
            raise ConfigError(f"mora_type must be one of {MORA_TYPES} or None (auto), got {self.mora_type!r}")
        check_probability("dropout", self.dropout)
        if self.init not in ("zeros", "random"):
            raise ConfigError(f"init must be 'zeros' (M = 0, the paper's init) or 'random' (tests), got {self.init!r}")

    def resolved_type(self, r: int) -> int:
        if self.mora_type is not None:
            return self.mora_type
        return 6 if r < 64 else 1

    def create_delta(self, module: nn.Module, path: str) -> nn.Module:
        kind = layer_kind(module)
        if kind not in self.supported_kinds:
            raise TargetError(f"MoRA supports Linear and Conv1D layers; '{path}' is {type(module).__name__}")
        r = pattern_value(self.rank_pattern, path, self.r)
        fan_in_fan_out = kind == "conv1d_t"
        in_features, out_features = linear_features(module)
        mora_type = self.resolved_type(r)
        r_hat = mora_rank(in_features, out_features, r, mora_type)
        return MoraLinear(in_features, out_features, r_hat, mora_type, self.dropout, self.init, fan_in_fan_out)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class MoraRows(RowStacker):
    """Mixed-adapter batches: ``y_i = out_i + decompress(compress(x_i) M_k^T)`` with the square matrices stacked
    [n+1, r_hat, r_hat] (zero at slot 0 and outside the group) and applied per row by batched matmul. Grouped by
    (r_hat, type, in, out): the deltas of a group share compress / decompress, which one of them runs for all."""

    @classmethod
    def group_key(cls, delta: Delta, layer: Any) -> Hashable | None:
        return delta.r_hat, delta.mora_type, delta.in_features, delta.out_features

    @classmethod
    def build(cls, layer: Any, members: list[tuple[int, Delta]], n_slots: int) -> tuple[Delta, torch.Tensor]:
        m = [(k, d.mora_M.weight) for k, d in members]
        return members[0][1], stack_slots(m, n_slots)

    @classmethod
    def apply(cls, state: tuple, layer: Any, rows: RowIndex, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        representative, m = state
        batch = x.shape[0]
        per_row = m[rows.slots]
        per_row = per_row[:, None] if representative.mora_type == 6 else per_row  # type 6: M on [b, t, chunks, r]
        return out + representative.update(x.to(out.dtype).reshape(batch, -1, x.shape[-1]), per_row).reshape(out.shape)


class MoraLinear(MergeableDelta):
    """``out + decompress(M compress(drop(x)))``; M is ``mora_M.weight`` [r_hat, r_hat]."""

    row_stackers = (MoraRows,)  # a subclass that changes ``update`` must set ()

    def __init__(
        self, in_features: int, out_features: int, r_hat: int, mora_type: int, dropout: float, init: str,
        fan_in_fan_out: bool,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.r_hat, self.mora_type = in_features, out_features, r_hat, mora_type
        self.fan_in_fan_out = fan_in_fan_out
        self.mora_M = nn.Linear(r_hat, r_hat, bias=False)
        self.dropout = dropout_module(dropout)
        if initialising():
            with torch.no_grad():
                if init == "zeros":
                    self.mora_M.weight.zero_()
                else:
                    nn.init.normal_(self.mora_M.weight, std=1 / r_hat)
        self.pad = (-in_features) % r_hat
        self.chunks = (in_features + self.pad) // r_hat
        if mora_type == 6:  # computed, in no file: on a real device also when built for filling (protocol.no_init)
            inv_freq = 1.0 / (10000 ** (torch.arange(0, r_hat, 2, dtype=torch.float64, device="cpu") / r_hat))
            angles = torch.outer(torch.arange(self.chunks, dtype=torch.float64, device="cpu"), inv_freq)
            angles = torch.cat((angles, angles), dim=-1)  # [chunks, r_hat]
            self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
            self.register_buffer("rope_sin", angles.sin().float(), persistent=False)

    def _padded(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Pad [..., in] cyclically to [..., total] (``x[:pad]`` appended, repeated if pad > in)."""
        if total == self.in_features:
            return x
        reps = -(-total // self.in_features)
        return torch.cat([x] * reps, dim=-1)[..., :total]

    def _expand(self, z: torch.Tensor, width: int, mode: str) -> torch.Tensor:
        """[..., width] -> [..., out] by tiling or repeat-interleaving, then truncating."""
        if mode == "interleave":
            z = z.repeat_interleave(-(-self.out_features // width), dim=-1)
        elif width < self.out_features:
            z = torch.cat([z] * -(-self.out_features // width), dim=-1)
        return z[..., : self.out_features]

    def update(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The delta's output for input ``x`` [..., in] with square matrix ``m`` (linear in x); ``m`` may carry batch
        dims that broadcast against ``x`` (mixed-adapter batches pass one matrix per row)."""
        r_hat = self.r_hat
        if self.mora_type == 6:
            chunks = self._padded(x, self.chunks * r_hat).unflatten(-1, (self.chunks, r_hat))
            rotated = chunks * self.rope_cos.to(x.dtype) + _rotate_half(chunks) * self.rope_sin.to(x.dtype)
            return self._expand((rotated @ m.mT).flatten(-2), self.chunks * r_hat, "tile")
        compress, decompress = _PLAN[self.mora_type]
        if compress == "cyclic":
            z = self._padded(x, self.chunks * r_hat).unflatten(-1, (self.chunks, r_hat)).sum(-2)
        else:
            group = -(-self.in_features // r_hat)
            z = self._padded(x, group * r_hat).unflatten(-1, (r_hat, group)).sum(-1)
        return self._expand(z @ m.mT, r_hat, decompress)

    def forward(self, x: torch.Tensor, out: torch.Tensor, layer: DeltaLayer) -> torch.Tensor:
        dtype = self.mora_M.weight.dtype
        return out + self.update(self.dropout(x.to(dtype)), self.mora_M.weight).to(out.dtype)

    def delta_weight(self, layer: DeltaLayer) -> torch.Tensor:
        """Exact ``dW`` [out, in] (transposed for Conv1D): the delta applied to the identity, in float64."""
        m = self.mora_M.weight.detach().double()
        with torch.no_grad():
            columns = self.update(torch.eye(self.in_features, dtype=torch.float64, device=m.device), m)  # row j = dW[:, j]
        return (columns if self.fan_in_fan_out else columns.T).float()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r_hat={self.r_hat}, type={self.mora_type}"


def mora_parameter_count(in_features: int, out_features: int, r: int, mora_type: Any = 6) -> int:
    """Parameters of M for one layer (compare with LoRA's ``r * (in + out)``)."""
    return mora_rank(in_features, out_features, r, mora_type) ** 2
