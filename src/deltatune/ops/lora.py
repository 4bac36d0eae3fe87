"""Fused LoRA linear: ``y = x W^T + b + s * (drop(x) A^T) B^T`` as one autograd function.

W [out, in] and b are the frozen base weight and bias, A [r, in] and B [out, r] the LoRA factors, s the scaling,
``drop`` inverted dropout with probability p (``x * keep / (1 - p)``). Two paths, both equal to the plain formula
up to float rounding (tests/test_ops.py):

* merged (no active dropout, weights and input of one dtype): ``y = x (W + s B A)^T + b``: a single
  [tokens, in] x [in, out] matmul, the same as the frozen base alone. Backward: ``grad_x = g (W + s B A)``
  (the [out, in] weight is rebuilt, never stored), ``grad_B = s g^T h`` and ``grad_A = s (g B)^T x`` with
  ``h = x A^T``. Nothing of size [tokens, out] is created besides ``y`` and the gradient.
* branch (active dropout, or few tokens, or a low-precision base): ``y = x W^T + b`` then ``y += s h B^T`` in
  place (h = drop(x) A^T). The keep mask is kept as 1 bit per element (``ops.dropout``) instead of a dropped-out
  float copy of x, and unpacked in backward; it is applied by a plain float multiply.
  Backward adds the masked LoRA input gradient into the base's in place (one ``addcmul_``/``addmm_``).
  With dropout on CPU and one dtype throughout, the masked steps run over cache-sized row chunks instead
  (``ops.lora_chunked``: same formula, same mask).

Rank-r products are computed transposed (``h^T = A x^T`` [r, tokens], ``(gB)^T = B^T g^T``,
``grad_B = (h^T g)^T``): with r = 8 these layouts are 3-6x faster on CPU than ``g^T h`` or ``g B``, whose
[tokens, r] operands make BLAS walk memory with a stride of r.
Saved for backward: x (only when A needs a gradient), h^T [r, tokens] (only when B does) and the mask (packed
bits on CPU; off CPU or while compiling, the bool mask); W, b, A, B are parameters and cost nothing to save.
When x is the output of GELU/SiLU or of a product whose inputs autograd already keeps (FFN down projections),
references to those inputs are saved instead and x is recomputed in backward (``ops.recompute``).
With ``weight=None`` the function adds the LoRA branch to a given base output ``out`` instead (several adapters
on one layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import compat, lora_chunked, recompute
from .dropout import draw_keep, new_stream, seeded, unpack_keep


def _merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + s B A`` [out, in]."""
    return torch.addmm(weight, lora_b, lora_a, alpha=scaling)


def _in_dtype(x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x2 if x2.dtype == dtype else x2.to(dtype)


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")  # backward runs under the forward's CPU autocast state (bf16 matmuls)
    def forward(ctx, x, out, weight, bias, lora_a, lora_b, scaling: float, p: float, merged: bool):
        lora_dtype = lora_a.dtype
        in_features, out_features = lora_a.shape[1], lora_b.shape[0]
        x2 = x.reshape(-1, in_features)
        needs_x, _, _, _, needs_a, needs_b = ctx.needs_input_grad[:6]
        mask_state = None
        ht = None  # h^T = A drop(x)^T [r, tokens]
        # one dtype throughout; not under autocast, whose matmuls would change dtype mid-way (bf16 y + fp32 h)
        chunked = (p > 0 and weight is not None and seeded(x) and x.dtype == weight.dtype == lora_dtype
                   and not torch.is_autocast_enabled(x.device.type))
        if chunked:
            y2, ht, bits = lora_chunked.forward(x2, weight, bias, lora_a, lora_b, scaling, p, new_stream(p),
                                                keep_bits=needs_a or needs_x)
            y = y2.view(*x.shape[:-1], out_features)
            mask_state = None if bits is None else torch.from_numpy(bits)
            if not needs_b:
                ht = None
        elif merged:
            y = F.linear(x, _merged_weight(weight, lora_a, lora_b, scaling), bias)
            if needs_b:
                ht = lora_a @ x2.T
        else:
            xl = _in_dtype(x2, lora_dtype)
            if p > 0:
                keep, mask_state = draw_keep(x, p, lora_dtype)
                xl = torch.mul(xl, keep.view(xl.shape), out=keep.view(xl.shape))
            ht = lora_a @ xl.T
            del xl
            if p > 0:
                ht.mul_(1.0 / (1.0 - p))
            if weight is not None:
                y = F.linear(x, weight, bias)
                y2 = y.view(-1, out_features)
                if y.dtype == lora_dtype:
                    y2.addmm_(ht.T, lora_b.T, alpha=scaling)
                else:
                    y2.add_((ht.T @ lora_b.T * scaling).to(y.dtype))
            else:
                out2 = out.reshape(-1, out_features)
                if out.dtype == lora_dtype:
                    y = torch.addmm(out2, ht.T, lora_b.T, alpha=scaling).view(out.shape)
                else:
                    y = (out2 + (ht.T @ lora_b.T * scaling).to(out.dtype)).view(out.shape)
            if not needs_b:
                ht = None
        ctx.scaling, ctx.p, ctx.merged, ctx.chunked = scaling, p, merged, chunked
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.has_out = out is not None
        kept_mask = mask_state if needs_a or needs_x else None
        ctx.save_for_backward(weight, lora_a, lora_b, ht, kept_mask, *recompute.save_input(ctx, x, needs_a))
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        weight, lora_a, lora_b, ht, kept_mask, *saved_x = ctx.saved_tensors
        x = recompute.load_input(ctx, saved_x)
        needs_x, needs_out, _, _, needs_a, needs_b = ctx.needs_input_grad[:6]
        s, p = ctx.scaling, ctx.p
        lora_dtype = lora_a.dtype
        in_features, out_features = lora_a.shape[1], lora_b.shape[0]
        g2 = grad.reshape(-1, out_features)
        if ctx.chunked:
            x2 = None if x is None else x.reshape(-1, in_features)
            grad_x, grad_a, grad_b = lora_chunked.backward(
                g2, x2, weight, lora_a, lora_b, ht, None if kept_mask is None else kept_mask.numpy(), s, p,
                (needs_x, needs_a, needs_b))
            grad_x = None if grad_x is None else grad_x.view(ctx.x_shape)
            return grad_x, None, None, None, grad_a, grad_b, None, None, None
        gl = _in_dtype(g2, lora_dtype)
        grad_x = grad_out = grad_a = grad_b = None
        keep = None
        if p > 0 and (needs_a or (needs_x and not ctx.merged)):
            keep = unpack_keep(kept_mask, g2.shape[0] * in_features, lora_dtype).view(-1, in_features)
        ght = None  # (s/(1-p)) (g B)^T [r, tokens]
        if needs_a or (needs_x and not ctx.merged):
            ght = lora_b.T @ gl.T
            ght.mul_(s / (1.0 - p) if p > 0 else s)
        if needs_x:
            if ctx.merged:
                grad_x = g2 @ _merged_weight(weight, lora_a, lora_b, s)
            elif weight is not None and keep is None and g2.dtype == lora_dtype:
                grad_x = (g2 @ weight).addmm_(ght.T, lora_a)
            else:
                lora_gx = ght.T @ lora_a  # [tokens, in]; dropped elements get no gradient
                if weight is not None and keep is not None and lora_gx.dtype == g2.dtype:
                    grad_x = (g2 @ weight).addcmul_(lora_gx, keep)
                else:
                    if keep is not None:
                        lora_gx.mul_(keep)
                    lora_gx = _in_dtype(lora_gx, ctx.x_dtype)
                    grad_x = lora_gx if weight is None else (g2 @ weight).add_(lora_gx)
            grad_x = grad_x.view(ctx.x_shape)
        if needs_out and ctx.has_out:
            grad_out = grad
        if needs_a:
            xl = _in_dtype(x.reshape(-1, in_features), lora_dtype)
            if keep is not None:
                xl = torch.mul(xl, keep, out=keep)
            grad_a = ght @ xl
        if needs_b:
            grad_b = (ht @ gl).mul_(s).T
        return grad_x, grad_out, None, None, grad_a, grad_b, None, None, None


def _use_merged(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, p: float) -> bool:
    """The merged path pays ``out * in * r`` to rebuild ``W + s B A``; worth it once tokens * (in + out) >= in * out."""
    if p > 0 or x.dtype != weight.dtype or weight.dtype != lora_a.dtype:
        return False
    out_features, in_features = weight.shape
    tokens = x.numel() // in_features
    return tokens * (in_features + out_features) >= in_features * out_features


def lora_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
    scaling: float, p: float = 0.0,
) -> torch.Tensor:
    """``x W^T + b + s * (drop_p(x) A^T) B^T`` for a frozen W [out, in] (pass p = 0 outside training).

    W and b must not require gradients (callers fall back to the plain formula when they do).
    """
    if not torch.is_grad_enabled() or not (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad):
        if p > 0:
            return lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, p)
        if _use_merged(x, weight, lora_a, p):
            return F.linear(x, _merged_weight(weight, lora_a, lora_b, scaling), bias)
        y = F.linear(x, weight, bias)
        return lora_add(x, y, lora_a, lora_b, scaling)
    merged = _use_merged(x, weight, lora_a, p)
    return _LoraLinearFn.apply(x, None, weight, bias, lora_a, lora_b, scaling, p, merged)


def lora_add(
    x: torch.Tensor, out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, p: float = 0.0
) -> torch.Tensor:
    """``out + s * (drop_p(x) A^T) B^T`` (the LoRA branch added to a given base output)."""
    if not torch.is_grad_enabled() or not (x.requires_grad or out.requires_grad or lora_a.requires_grad
                                           or lora_b.requires_grad):
        if p > 0:
            return out + (F.dropout(x.to(lora_a.dtype), p) @ lora_a.T @ lora_b.T * scaling).to(out.dtype)
        h = x.reshape(-1, lora_a.shape[1]).to(lora_a.dtype) @ lora_a.T
        out2 = out.reshape(-1, lora_b.shape[0])
        if out.dtype == lora_a.dtype:
            return torch.addmm(out2, h, lora_b.T, alpha=scaling).view(out.shape)
        return (out2 + (h @ lora_b.T * scaling).to(out.dtype)).view(out.shape)
    return _LoraLinearFn.apply(x, out, None, None, lora_a, lora_b, scaling, p, False)


def lora_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
    scaling: float, p: float = 0.0, keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain formula with autograd: ``F.linear(x, W, b) + (B(A(drop(x))) * s)``; ``keep`` fixes the mask."""
    out = F.linear(x, weight, bias)
    xd = x.to(lora_a.dtype)
    if keep is not None:
        xd = torch.where(keep, xd, 0.0) / (1 - p)
    elif p > 0:
        xd = F.dropout(xd, p)
    return out + (F.linear(F.linear(xd, lora_a), lora_b) * scaling).to(out.dtype)


def fusable_base(base: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(W [out, in], b)`` when ``base(x)`` is exactly ``x W^T + b`` with W and b frozen, else None.

    True for a plain ``nn.Linear`` or transformers ``Conv1D`` (weight [in, out], used transposed) without hooks,
    outside autocast, with ``x`` of the weight's dtype; quantized layers, subclasses and trainable bases are not.
    """
    from torch.nn.modules import module as module_state

    if not compat.PRIVATE_API_OK:  # the global hook registries below are private: untested torch, plain path
        return None
    if base._forward_hooks or base._forward_pre_hooks or module_state._global_forward_hooks \
            or module_state._global_forward_pre_hooks or torch.is_autocast_enabled():
        return None
    kind = type(base)
    if kind is torch.nn.Linear:
        weight = base._parameters["weight"]
    elif kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers"):
        weight = base._parameters["weight"].T
    else:
        return None
    bias = base._parameters.get("bias")
    if weight.requires_grad or (bias is not None and bias.requires_grad) or x.dtype != weight.dtype:
        return None
    return weight, bias
