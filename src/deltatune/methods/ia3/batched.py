"""IA3's stacked paths for mixed-adapter batches (row stackers, ``deltatune.protocol``): row i uses adapter k(i).

The vectors of the layer's IA3 deltas of one side are stacked [n+1, features], exactly 1 at slot 0 and at every
slot outside the group, and each row gathers its own:

* ``IA3InputRows`` (``IA3Input``, feed-forward targets), phase "input": ``x'_i = l_k * x_i`` before the one base
  pass, so ``y_i = W (l_k * x_i) + b``; every other row is multiplied by exactly 1, so its base output and the
  terms other stackers add to it (computed from the original ``x``) are those of its own single run;
* ``IA3OutputRows`` (``IA3Output``), phase "after": ``y_i = l_k * y_i``, the whole output of the row (its base
  output, bias included: a row has one adapter, so no other term is in it).

Each product is the one the delta's own forward computes, in the same dtype, so an IA3 row equals its
single-adapter run up to the float summation order of the base's matmul over a larger batch. Convolutions (whose
vector broadcasts over [N, C, *spatial]) are refused: the per-adapter loop runs them.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch

from ...protocol import Delta, RowIndex, RowStacker, stack_slots


def _stack(members: list[tuple[int, Delta]], n_slots: int) -> torch.Tensor:
    """[n_slots, features]: each member's ``l`` at its slot, ones elsewhere (differentiable)."""
    vectors = [(k, d.ia3_l.flatten()) for k, d in members]
    return stack_slots(vectors, n_slots, fill=1.0)


def _per_row(state: torch.Tensor, rows: RowIndex, like: torch.Tensor) -> torch.Tensor:
    """Each row's vector, shaped [batch, 1, ..., features] to broadcast against ``like`` [batch, ..., features]."""
    return state[rows.slots].reshape(like.shape[0], *([1] * (like.dim() - 2)), -1)


class _IA3Rows(RowStacker):
    """What both sides share: one stack of the layer's IA3 vectors of that side; convolutions are looped."""

    @classmethod
    def group_key(cls, delta: Delta, layer: Any) -> Hashable | None:
        return None if delta.kind == "conv" else ()

    @classmethod
    def build(cls, layer: Any, members: list[tuple[int, Delta]], n_slots: int) -> torch.Tensor:
        return _stack(members, n_slots)


class IA3InputRows(_IA3Rows):
    """``x'_i = l_k * x_i``: the layer input scaled per row before the base runs (see the module doc)."""

    phase = "input"

    @classmethod
    def transform(cls, state: torch.Tensor, layer: Any, rows: RowIndex, x: torch.Tensor) -> torch.Tensor:
        # the delta's own transform_input: scale in the vector's dtype, back to the input's
        return (x.to(state.dtype) * _per_row(state, rows, x)).to(x.dtype)


class IA3OutputRows(_IA3Rows):
    """``y_i = l_k * y_i``: the row's whole output scaled per output feature (see the module doc)."""

    phase = "after"

    @classmethod
    def apply(cls, state: torch.Tensor, layer: Any, rows: RowIndex, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out * _per_row(state, rows, out)
