"""Causal-LM loss without full-vocabulary logits: a fused, chunked ``lm_head`` + cross-entropy autograd function.

For the N positions whose (shifted) label is not -100, with hidden states ``h`` [N, H], head weight ``W`` [V, H]
(optional bias ``b``) and targets ``y``::

    z_i = h_i W^T + b                      (logits of one row, [V])
    loss = (1/N) sum_i (logsumexp(z_i) - z_i[y_i])
    dloss/dz_i = (softmax(z_i) - onehot(y_i)) / N  =: p_i
    grad_h = p W        grad_W = p^T h        grad_b = sum_i p_i

Positions whose label is -100 (prompt, padding) never reach the head. The rest go through it ``chunk`` rows at a
time, so at most [chunk, V] logits exist at once (the plain path holds [B*T, V] logits, their softmax and their
gradient, ~0.4 GB each per 2,048 tokens at V = 49,152). Two ways to get the gradients, same formula:

* ``eager=True``: while each chunk's logits exist in the forward pass, ``p`` is formed and ``grad_h`` (and, for a
  trainable head, ``grad_W``/``grad_b``) computed at once; backward only scales them by the incoming gradient.
  2 matmuls per chunk for a frozen head (3 trainable), the plain path's count; saves grad_h [N, H] (and grad_W).
* ``eager=False``: forward keeps only the log-sum-exp per row; backward recomputes each chunk's logits from the
  saved ``h``, one matmul more.

Under autocast the logits come from a matmul in the autocast dtype and are upcast to float32 before the softmax,
as transformers does (``logits.float()``). The loss equals ``F.cross_entropy(h W^T + b, y)`` up to float rounding
(tests/test_fused_ce.py), for the gradients of h, W and b, tied embeddings included (W's gradient accumulates into
the shared parameter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 8M floats = 32 MB in float32 (170 rows at V = 49,152)


def chunk_rows(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that a chunk's [rows, vocab] logits hold about ``elements`` values (at least 16 rows)."""
    return max(16, elements // max(vocab, 1))


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``h W^T + b`` in the operands' dtype, upcast to float32 (float64 stays)."""
    z = F.linear(h, weight, bias)
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _chunk_grad(z: torch.Tensor, lse: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """``p = (softmax(z) - onehot(y)) * scale`` in place of ``z`` (float32 [rows, V])."""
    p = z.sub_(lse.unsqueeze(1)).exp_()
    p[torch.arange(len(y), device=y.device), y] -= 1.0
    return p.mul_(scale)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, y, chunk: int, scale: float, eager: bool, dtype: torch.dtype):
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        acc = torch.promote_types(dtype, torch.float32)
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            bc = bias.to(dtype) if bias is not None else None
            total = torch.zeros((), dtype=acc, device=h.device)
            lses = torch.empty(len(y), dtype=acc, device=h.device)
            grad_h = torch.empty_like(h) if eager and needs_h else None
            grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if eager and needs_w else None
            grad_b = torch.zeros(bias.shape, dtype=acc, device=h.device) if eager and needs_b else None
            for start in range(0, len(y), chunk):
                rows = slice(start, start + chunk)
                z = _logits(hc[rows], wc, bc)
                lse = torch.logsumexp(z, dim=1)
                lses[rows] = lse
                total += (lse - z.gather(1, y[rows].unsqueeze(1)).squeeze(1)).sum()
                if grad_h is None and grad_w is None and grad_b is None:
                    continue
                p = _chunk_grad(z, lse, y[rows], scale)
                _accumulate(p, hc[rows], wc, grad_h, grad_w, grad_b, rows)
        ctx.chunk, ctx.scale, ctx.eager, ctx.dtype, ctx.weight_dtype = chunk, scale, eager, dtype, weight.dtype
        if eager:
            ctx.save_for_backward(grad_h, grad_w, grad_b)
        else:
            ctx.save_for_backward(h, weight, bias, y, lses)
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.eager:
            grad_h, grad_w, grad_b = (None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
            grad_w = grad_w.to(ctx.weight_dtype) if grad_w is not None else None
            grad_b = grad_b.to(ctx.weight_dtype) if grad_b is not None else None
        else:
            grad_h, grad_w, grad_b = _recompute_grads(ctx, grad_loss)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _accumulate(p, h, weight, grad_h, grad_w, grad_b, rows: slice) -> None:
    """Add one chunk's ``p W``, ``p^T h``, ``sum p`` to the gradients that are wanted (p cast to the matmul dtype)."""
    pc = p.to(weight.dtype)
    if grad_h is not None:
        grad_h[rows] = (pc @ weight).to(grad_h.dtype)
    if grad_w is not None:
        if pc.dtype == grad_w.dtype:
            grad_w.addmm_(pc.t(), h)
        else:
            grad_w += pc.t() @ h
    if grad_b is not None:
        grad_b += p.sum(0)


def _recompute_grads(ctx, grad_loss: torch.Tensor) -> list[torch.Tensor | None]:
    """``eager=False``: rebuild each chunk's logits from the saved h and form the gradients (module docstring)."""
    h, weight, bias, y, lses = ctx.saved_tensors
    needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
    scale = ctx.scale * float(grad_loss)
    acc = torch.promote_types(ctx.dtype, torch.float32)
    with torch.autocast(h.device.type, enabled=False):
        hc, wc = h.to(ctx.dtype), weight.to(ctx.dtype)
        bc = bias.to(ctx.dtype) if bias is not None else None
        grad_h = torch.empty_like(h) if needs_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if needs_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=h.device) if needs_b else None
        for start in range(0, len(y), ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            p = _chunk_grad(_logits(hc[rows], wc, bc), lses[rows], y[rows], scale)
            _accumulate(p, hc[rows], wc, grad_h, grad_w, grad_b, rows)
    return [grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None]


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
    chunk: int | None = None, eager: bool = True, reduction: str = "mean",
) -> torch.Tensor:
    """Mean (``reduction="sum"``: summed) cross-entropy of ``h W^T + b`` [N, V] against targets ``y`` [N] (all
    valid), never holding more than ``chunk`` rows of logits. Under autocast the matmul runs in the autocast dtype
    (the plain path's rounding)."""
    if chunk is None:
        chunk = chunk_rows(weight.shape[0])
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    if len(y) == 0:
        return (h.sum() * 0.0).float()  # nothing to learn from: a zero loss with a (zero) gradient path
    eager = eager and torch.is_grad_enabled()
    scale = 1.0 / len(y) if reduction == "mean" else 1.0
    return _LinearCrossEntropy.apply(h, weight, bias, y, chunk, scale, eager, dtype)


def causal_lm_loss(
    hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    chunk: int | None = None, eager: bool = True, reduction: str = "mean",
) -> torch.Tensor:
    """transformers' causal-LM loss (predict token t+1 from position t; mean (or sum) over labels != -100) from the
    last hidden states [B, T, H] without full logits: only positions with a target are gathered and sent to the head."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    h = hidden[:, :-1][keep]
    return linear_cross_entropy(h, weight, bias, targets[keep], chunk, eager, reduction)
