"""VeRA's stacked path for mixed-adapter batches (a row stacker, ``deltatune.protocol``): row i uses adapter k(i)::

    y_i = out_i + lambda_b,k * (B_k (lambda_d,k * (A_k x_i)))

The vectors are stacked, ``lambda_d`` [n+1, r_max] and ``lambda_b`` [n+1, out], zero at slot 0 and at every slot
outside the group (zero padding to the largest rank), so every other row gets an exact zero term. The projections:

* shared (the usual case: the adapters were drawn from the same ``projection_prng_key`` with the same r, or loaded
  with the same saved pair): one ``A_s`` [r, in] and ``B_s`` [out, r] serve every row, so a batch costs the two
  matmuls of a single adapter plus two per-row scalings;
* otherwise ``A`` [n+1, r_max, in] and ``B`` [n+1, out, r_max] are stacked and gathered per row (two ``bmm``).

The products are those of ``VeraLinear.forward`` in the same order, so each row equals its single-adapter run up
to float summation order. The shared pair is a child module's buffers, which the batching's cache watches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...protocol import Delta, RowIndex, RowStacker, pad_to, stack_slots


@dataclass
class VeraState:
    a: torch.Tensor  # A_s [r, in] when shared, else [n+1, r_max, in]
    b: torch.Tensor  # B_s [out, r] when shared, else [n+1, out, r_max]
    lambda_d: torch.Tensor  # [n+1, r_max]
    lambda_b: torch.Tensor  # [n+1, out]
    shared: bool


def _equal(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether every member uses the same projection values (then one pair serves all rows)."""
    a0, b0 = pairs[0]
    return all(a.shape == a0.shape and torch.equal(a, a0) and torch.equal(b, b0) for a, b in pairs[1:])


class VeraRows(RowStacker):
    """``y_i = out_i + lambda_b,k * (B_k (lambda_d,k * (A_k x_i)))`` for the layer's VeRA deltas (see the module doc)."""

    @classmethod
    def build(cls, layer: Any, members: list[tuple[int, Delta]], n_slots: int) -> VeraState:
        first = members[0][1].vera_lambda_d
        pairs = [d.projections.sliced(d.in_features, d.out_features, first.device) for _, d in members]
        pairs = [(a.to(first.dtype), b.to(first.dtype)) for a, b in pairs]  # the dtype the forward computes in
        r_max = max(d.vera_lambda_d.shape[0] for _, d in members)
        lambda_d = [(k, pad_to(d.vera_lambda_d, 0, r_max)) for k, d in members]
        lambda_b = [(k, d.vera_lambda_b) for k, d in members]
        vectors = (
            stack_slots(lambda_d, n_slots),
            stack_slots(lambda_b, n_slots),
        )
        if _equal(pairs):
            return VeraState(*pairs[0], *vectors, shared=True)
        slots = [k for k, _ in members]
        a = [pad_to(a, 0, r_max) for a, _ in pairs]
        b = [pad_to(b, 1, r_max) for _, b in pairs]
        a_stack = stack_slots(list(zip(slots, a)), n_slots)
        return VeraState(a_stack, stack_slots(list(zip(slots, b)), n_slots), *vectors, shared=False)

    @classmethod
    def apply(cls, state: VeraState, layer: Any, rows: RowIndex, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        xs = x.to(out.dtype).reshape(batch, -1, x.shape[-1])
        lambda_d = state.lambda_d[rows.slots][:, None, :]  # [batch, 1, r]
        lambda_b = state.lambda_b[rows.slots][:, None, :]  # [batch, 1, out]
        if state.shared:  # one pair for all rows: the single adapter's two matmuls over the whole batch
            hidden = lambda_d * F.linear(xs, state.a)
            return out + (lambda_b * F.linear(hidden, state.b)).reshape(out.shape)
        hidden = lambda_d * torch.bmm(xs, state.a[rows.slots].transpose(1, 2))
        return out + (lambda_b * torch.bmm(hidden, state.b[rows.slots].transpose(1, 2))).reshape(out.shape)
