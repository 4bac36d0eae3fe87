"""Fused DoRA linear (no active dropout): ``y = g * (x V^T) + b`` with ``V = W + s B A``, ``g = m / n``.

W [out, in], b frozen; A [r, in], B [out, r] the LoRA factors; m [out] the magnitude; n [out] = ``||V||`` per
output row, a constant in backward (DoRA section 4.3; computed by the caller, e.g. the lean norm in
``methods/dora.py``). Equal to DoRA's ``g * (W x + s B A x) + b`` up to float rounding.

Forward: one [tokens, in] x [in, out] matmul ``u = x V^T`` (V rebuilt from W, A, B: ``out * in * r``), then
``y = b + g * u`` (one elementwise pass). Backward: ``grad_x = g (g-scaled V)``, ``grad_B = s diag(g) g^T h``,
``grad_A = s (g diag(g) B)^T x`` with h = x A^T: the g-scaling lands on the small [out, in] / [out, r]
matrices, not on [tokens, out]; ``grad_m = sum_tokens(grad * u) / n`` is the only extra [tokens, out] pass.
Rank-r products are computed transposed (``h^T = A x^T``, ``grad_B = (h^T grad)^T``; 3-6x faster on CPU for small r).
Saved for backward: x (if A trains; rebuilt in backward instead when ``ops.recompute`` can), h^T [r, tokens]
(if B trains), u [tokens, out] (if m trains).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import recompute


def _direction(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``V = W + s B A`` [out, in]."""
    return torch.addmm(weight, lora_b, lora_a, alpha=scaling)


class _DoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, magnitude, norm, scaling: float):
        needs_x, _, _, needs_a, needs_b, needs_m = ctx.needs_input_grad[:6]
        in_features = lora_a.shape[1]
        u = F.linear(x, _direction(weight, lora_a, lora_b, scaling))
        gain = magnitude / norm
        y = u * gain if bias is None else torch.addcmul(bias, u, gain)
        ht = lora_a @ x.reshape(-1, in_features).T if needs_b else None  # h^T [r, tokens]
        ctx.scaling, ctx.x_shape = scaling, x.shape
        ctx.save_for_backward(weight, lora_a, lora_b, ht, u if needs_m else None, gain, norm,
                              *recompute.save_input(ctx, x, needs_a))
        del needs_x
        return y

    @staticmethod
    def backward(ctx, grad):
        weight, lora_a, lora_b, ht, u, gain, norm, *saved_x = ctx.saved_tensors
        x = recompute.load_input(ctx, saved_x)
        needs_x, _, _, needs_a, needs_b, needs_m = ctx.needs_input_grad[:6]
        s = ctx.scaling
        in_features, out_features = lora_a.shape[1], lora_b.shape[0]
        g2 = grad.reshape(-1, out_features)
        grad_x = grad_a = grad_b = grad_m = None
        if needs_x:
            scaled_v = _direction(weight, lora_a, lora_b, s).mul_(gain[:, None])
            grad_x = (g2 @ scaled_v).view(ctx.x_shape)
        if needs_a:
            ght = (lora_b * (gain * s)[:, None]).T @ g2.T  # [r, tokens] = s (B^T diag(g)) grad^T
            grad_a = ght @ x.reshape(-1, in_features)
        if needs_b:
            grad_b = (ht @ g2).mul_((gain * s)[None, :]).T  # s diag(g) grad^T h, computed as (h^T grad)^T
        if needs_m:
            grad_m = (u.reshape(-1, out_features) * g2).sum(0).div_(norm)  # u stays intact (retain_graph)
        return grad_x, None, None, grad_a, grad_b, grad_m, None, None


def dora_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
    magnitude: torch.Tensor, norm: torch.Tensor, scaling: float,
) -> torch.Tensor:
    """``(m / n) * (x (W + s B A)^T) + b`` for a frozen W [out, in]; ``norm`` is treated as a constant."""
    norm = norm.detach()
    if not torch.is_grad_enabled() or not any(
            t.requires_grad for t in (x, lora_a, lora_b, magnitude)):
        gain = magnitude / norm
        return F.linear(x, _direction(weight, lora_a, lora_b, scaling) * gain[:, None], bias)
    return _DoraLinearFn.apply(x, weight, bias, lora_a, lora_b, magnitude, norm, scaling)


def dora_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
    magnitude: torch.Tensor, norm: torch.Tensor, scaling: float,
) -> torch.Tensor:
    """DoRA's formula with autograd: ``g * (W x + s B A x) + b``, g = m / n with n detached."""
    gain = magnitude / norm.detach()
    return gain * (F.linear(x, weight) + F.linear(F.linear(x, lora_a), lora_b) * scaling) + (0 if bias is None else bias)
