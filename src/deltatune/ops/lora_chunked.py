"""LoRA linear with dropout on CPU: the masked steps computed over row chunks that stay in cache.

For each chunk of token rows ``x_c`` with its fresh keep mask ``k_c`` (1 bit per element, ``ops.dropout``):

* forward: ``h_c = (x_c * k_c) A'^T`` with ``A' = A / (1 - p)``; then, whole, ``y = x W^T + b + s h B^T``;
* backward, with ``G = (s / (1 - p)) (g B)^T`` [r, tokens]: ``grad_x = g W`` whole, then per chunk
  ``grad_x_c += (G_c^T A) * k_c`` and ``grad_A += G_c (x_c * k_c)``; ``grad_B = s g^T h``.

The whole-tensor version of the masked steps makes four [tokens, in] temporaries per call (0/1 mask, masked x
twice, the masked input gradient) that each go through memory; per chunk they are a few hundred KB, reused from
chunk to chunk, and the elementwise passes run from cache. The base matmuls stay whole (in trials on MiniLM's
shapes, row slices of them were slower than one call). The masks equal those of a whole-tensor draw
(``KeepStream`` gives the same bits in any chunking), so results match the plain formula up to float summation
order (tests/test_ops.py).
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

from .dropout import KeepStream, as_values, unpack_bits

CHUNK_ELEMENTS = 1 << 18  # elements of x per chunk: 1 MB in float32


_buffers = threading.local()


def _buffer(slot: int, rows: int, in_features: int, like: torch.Tensor) -> torch.Tensor:
    """A [rows, in] scratch tensor kept between calls (per thread), so that each call does not map fresh pages."""
    cache: dict = _buffers.__dict__.setdefault("cache", {})
    key = (slot, like.dtype)
    numel = rows * in_features
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = torch.empty(numel, dtype=like.dtype)
    return buf[:numel].view(rows, in_features)


def rows_per_chunk(in_features: int) -> int:
    """Token rows per chunk: a multiple of 8, so each chunk's mask starts on a byte of the packed bits."""
    return max(8, CHUNK_ELEMENTS // in_features // 8 * 8)


def _chunks(tokens: int, rows: int):
    for start in range(0, tokens, rows):
        yield start, min(tokens, start + rows)


def forward(
    x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
    scaling: float, p: float, stream: KeepStream, keep_bits: bool,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
    """``(y [tokens, out], h^T [r, tokens], packed mask bits or None)`` for ``x2`` [tokens, in]."""
    tokens, in_features = x2.shape
    rows = rows_per_chunk(in_features)
    ht = x2.new_empty(lora_a.shape[0], tokens)
    bits = np.empty((tokens * in_features + 7) // 8, np.uint8) if keep_bits else None
    a_scaled = lora_a / (1.0 - p)
    masked = _buffer(0, rows, in_features, x2)
    for start, end in _chunks(tokens, rows):
        n = (end - start) * in_features
        keep = stream.draw(n)
        if bits is not None:
            bits[start * in_features // 8: start * in_features // 8 + (n + 7) // 8] = np.packbits(keep)
        k = torch.from_numpy(keep.view(np.uint8)).view(-1, in_features)  # 0/1 bytes, widened inside the multiply
        xk = torch.mul(x2[start:end], k, out=masked[: end - start])
        torch.mm(a_scaled, xk.T, out=ht[:, start:end])
    y = F.linear(x2, weight, bias).addmm_(ht.T, lora_b.T, alpha=scaling)
    return y, ht, bits


def backward(
    g2: torch.Tensor, x2: torch.Tensor | None, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
    ht: torch.Tensor | None, bits: np.ndarray, scaling: float, p: float, needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(grad_x [tokens, in], grad_A, grad_B)``, each None where ``needs`` (x, A, B) is False."""
    needs_x, needs_a, needs_b = needs
    tokens, in_features = g2.shape[0], lora_a.shape[1]
    grad_x = grad_a = grad_b = None
    if needs_x or needs_a:
        rows = rows_per_chunk(in_features)
        gbt = lora_b.T @ g2.T  # (g B)^T [r, tokens]
        gbt.mul_(scaling / (1.0 - p))
        grad_x = g2 @ weight if needs_x else None
        grad_a = torch.zeros_like(lora_a) if needs_a else None
        mask, scratch = _buffer(1, rows, in_features, g2), _buffer(2, rows, in_features, g2)
        for start, end in _chunks(tokens, rows):
            n = (end - start) * in_features
            keep = unpack_bits(bits[start * in_features // 8: start * in_features // 8 + (n + 7) // 8], n)
            k = as_values(keep, g2.dtype, mask.view(-1)[:n]).view(-1, in_features)
            if grad_x is not None:
                grad_x[start:end].addcmul_(torch.mm(gbt[:, start:end].T, lora_a, out=scratch[: end - start]), k)
            if grad_a is not None:
                grad_a.addmm_(gbt[:, start:end], torch.mul(x2[start:end], k, out=scratch[: end - start]))
    if needs_b:
        grad_b = (ht @ g2).mul_(scaling).T
    return grad_x, grad_a, grad_b
