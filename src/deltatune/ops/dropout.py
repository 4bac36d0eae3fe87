"""Dropout keep-masks for the fused ops, kept as 1 bit per element between forward and backward.

On CPU (eager) one 62-bit seed is drawn from torch's default generator (so ``torch.manual_seed``, ``fork_rng`` and
``get/set_rng_state`` govern it) and expanded by numpy's PCG64 into 32 random bits per element. Element i is kept
iff its bits, read as an int32 ``u_i``, satisfy ``u_i >= -2^31 + round(p 2^32)``: dropped with probability
``round(p 2^32) / 2^32`` (within 2^-33 of p; torch's ``bernoulli_`` on a float uniform resolves p to 2^-24).
The comparison (numpy, into a bool array) is packed to bits for backward (n/8 bytes) and widened to 0/1 floats
so that applying the mask is a plain multiply. Per element (``benchmarks/bench_ops.py``) the draw costs ~1.3 ns
(0.8 of it PCG64) against ~5 ns for ``bernoulli_``, and backward's unpack ~0.2 ns, where redrawing from the seed
cost the full draw again; the 1-bit mask is 1/32 of a float copy of the input.
Elsewhere (other devices, or while ``torch.compile`` traces) a bool mask ``rand >= p`` is drawn and kept.
"""

from __future__ import annotations

import numpy as np
import torch

# what backward needs to rebuild the mask: packed bits (uint8, CPU eager) or the bool mask itself
MaskState = torch.Tensor


def _threshold(p: float) -> int:
    """int32 threshold: kept iff the element's bits read as int32 are >= it."""
    return -2**31 + min(round(p * 2**32), 2**32 - 1)


def _seeded(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _keep_bits(seed: int, n: int, p: float) -> np.ndarray:
    """Bool [n]: 32 PCG64 bits per element compared with the threshold."""
    words = np.random.PCG64(seed).random_raw((n + 1) // 2)
    return np.greater_equal(words.view(np.int32)[:n], _threshold(p))


def _as_values(keep: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """0/1 values of ``dtype`` from a bool array (float32 straight from numpy's cast, others via torch)."""
    if dtype == torch.float32:
        values = torch.empty(keep.shape[0], dtype=torch.float32)
        np.copyto(values.numpy(), keep, casting="unsafe")
        return values
    return torch.from_numpy(keep).to(dtype)


def _from_seed(seed: int, n: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    """Flat [n] tensor of 0/1 (dtype) from ``seed`` (the draw itself, without packing)."""
    return _as_values(_keep_bits(seed, n, p), dtype)


def draw_keep(x: torch.Tensor, p: float, dtype: torch.dtype) -> tuple[torch.Tensor, MaskState]:
    """A fresh keep mask for ``x`` (probability 1 - p per element): its 0/1 values of ``dtype`` shaped [-1] and
    the state to pass to ``unpack_keep`` in backward."""
    if _seeded(x):
        keep = _keep_bits(int(torch.randint(0, 2**62, ())), x.numel(), p)
        return _as_values(keep, dtype), torch.from_numpy(np.packbits(keep))
    keep = torch.rand(x.numel(), device=x.device) >= p
    return keep.to(dtype), keep


def unpack_keep(state: MaskState, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The ``n`` values ``draw_keep`` returned with this state."""
    if state.dtype == torch.uint8:
        return _as_values(np.unpackbits(state.numpy(), count=n).view(np.bool_), dtype)
    return state.to(dtype)


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The bool mask (shaped like x, True = kept) that the fused ops draw next from the same generator state."""
    values, _ = draw_keep(x, p, torch.float32)
    return values.view(x.shape).bool()
