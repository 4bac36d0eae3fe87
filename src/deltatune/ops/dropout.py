"""Dropout keep-masks for the fused ops, kept as 1 bit per element between forward and backward.

On CPU (eager) one 62-bit seed is drawn from torch's default generator (so ``torch.manual_seed``, ``fork_rng`` and
``get/set_rng_state`` govern it) and expanded by numpy's PCG64. Element i is dropped iff a 32-bit uniform integer
``U_i < T = round(p 2^32)``: dropped with probability ``T / 2^32`` (within 2^-33 of p; torch's ``bernoulli_`` on a
float uniform resolves p to 2^-24). ``U_i`` is compared byte by byte, most significant first: its top byte ``b_i``
(one random byte per element, from the main stream) decides unless it equals T's top byte (probability 1/256), and
only those ties take 24 more bits, from a second stream. This draws ~8 random bits per element instead of 32 and is
exactly the 32-bit comparison. Both streams are read in element order, so a mask drawn in chunks (multiples of 8
elements) equals the mask drawn at once.

Per element (``benchmarks/bench_ops.py``) a whole-tensor draw into 0/1 floats costs ~0.7 ns against ~5 ns for
``bernoulli_``; the bool mask is packed to bits for backward (n/8 bytes, 1/32 of a float copy of the input).
Elsewhere (other devices, or while ``torch.compile`` traces) a bool mask ``rand >= p`` is drawn and kept.
"""

from __future__ import annotations

import numpy as np
import torch

# what backward needs to rebuild the mask: packed bits (uint8, CPU eager) or the bool mask itself
MaskState = torch.Tensor
_LOW_BITS = (1 << 24) - 1


class KeepStream:
    """Keep masks (True with probability 1 - p) for consecutive elements, drawn from one seed.

    ``draw(m)`` returns the next m elements' mask; every call but the last must ask for a multiple of 8.
    """

    def __init__(self, seed: int, p: float) -> None:
        main, ties = np.random.SeedSequence(seed).spawn(2)
        self._main, self._ties = np.random.PCG64(main), np.random.PCG64(ties)
        threshold = min(round(p * 2**32), 2**32 - 1)
        self._top, self._low = threshold >> 24, threshold & _LOW_BITS

    def draw(self, count: int) -> np.ndarray:
        """Bool [count]: kept iff the element's 32-bit uniform is >= round(p 2^32)."""
        top = self._main.random_raw((count + 7) // 8).view(np.uint8)
        keep = np.greater(top, self._top)
        tied = np.equal(top, self._top)
        words = np.flatnonzero(tied.view(np.uint64) != 0)  # 8 elements a word: ties are rare, find their words first
        if words.size:
            candidates = (words[:, None] * 8 + np.arange(8)).ravel()
            ties = candidates[tied[candidates]]
            keep[ties] = (self._ties.random_raw(ties.size) & _LOW_BITS) >= self._low
        return keep[:count]


def new_stream(p: float) -> KeepStream:
    """A stream seeded from torch's default generator (one draw of a 62-bit seed)."""
    return KeepStream(int(torch.randint(0, 2**62, ())), p)


def seeded(x: torch.Tensor) -> bool:
    """Whether masks for ``x`` come from a ``KeepStream`` (CPU, eager) rather than ``torch.rand``."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def as_values(keep: np.ndarray, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """0/1 values of ``dtype`` from a bool array (float32 straight from numpy's cast, others via torch)."""
    if dtype == torch.float32:
        values = torch.empty(keep.shape[0], dtype=torch.float32) if out is None else out
        np.copyto(values.numpy(), keep, casting="unsafe")
        return values
    values = torch.from_numpy(keep).to(dtype)
    return values if out is None else out.copy_(values)


def unpack_bits(bits: np.ndarray, count: int) -> np.ndarray:
    """Bool [count] from ``np.packbits`` output."""
    return np.unpackbits(bits, count=count).view(np.bool_)


def draw_keep(x: torch.Tensor, p: float, dtype: torch.dtype) -> tuple[torch.Tensor, MaskState]:
    """A fresh keep mask for ``x`` (probability 1 - p per element): its 0/1 values of ``dtype`` shaped [-1] and
    the state to pass to ``unpack_keep`` in backward."""
    if seeded(x):
        keep = new_stream(p).draw(x.numel())
        return as_values(keep, dtype), torch.from_numpy(np.packbits(keep))
    keep = torch.rand(x.numel(), device=x.device) >= p
    return keep.to(dtype), keep


def unpack_keep(state: MaskState, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The ``n`` values ``draw_keep`` returned with this state."""
    if state.dtype == torch.uint8:
        return as_values(unpack_bits(state.numpy(), n), dtype)
    return state.to(dtype)


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The bool mask (shaped like x, True = kept) that the fused ops draw next from the same generator state."""
    values, _ = draw_keep(x, p, torch.float32)
    return values.view(x.shape).bool()
