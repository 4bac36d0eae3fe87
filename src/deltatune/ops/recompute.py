"""Rebuild a LoRA layer's input in backward from tensors autograd already keeps, instead of saving it.

LoRA's A-gradient needs the layer input: ``grad_A = (g B)^T x``. The frozen base layer never keeps x, so saving
it costs a [tokens, in] tensor per adapted layer. When x is the direct output of an elementwise op whose own
backward already holds that op's inputs, the fused op saves references to those inputs (no new memory) and
recomputes x in backward with the same op on the same tensors, which gives the same values:

* ``x = gelu(u)`` (any ``approximate``) or ``x = silu(u)``: autograd keeps u; x is rebuilt as ``act(u)``;
* ``x = a * b`` with both factors requiring grad: autograd keeps a and b (Llama's gated MLP ``act(gate) * up``
  and GPT-2's tanh GELU end this way); x is rebuilt as ``a * b``.

These are the FFN down/output projections' inputs, the widest in a transformer layer. In MiniLM they are 151 of
the ~245 MB that LoRA on every linear adds to the saved activations (32 x 128 tokens). The price is one
elementwise pass per layer in backward.

Off when there is nothing to gain or it would not be safe: while ``torch.compile`` traces, and under
``saved_tensors_hooks`` (activation checkpointing or offloading, where reading another node's saved tensors
would run their unpack hooks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import compat

Rebuild = tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]


def _saved(node, name: str) -> torch.Tensor | None:
    try:
        value = getattr(node, name)
    except (AttributeError, RuntimeError):  # not saved by this node, or already freed
        return None
    return value if isinstance(value, torch.Tensor) else None


def _hooks_active() -> bool:
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError):  # API moved: assume hooks, stay on the safe side
        return True


def plan(x: torch.Tensor) -> Rebuild | None:
    """``(op, inputs)`` with ``op(*inputs)`` equal to x, the inputs already kept by x's producer; else None."""
    if not compat.PRIVATE_API_OK or torch.compiler.is_compiling() or _hooks_active():
        return None
    node = x.grad_fn
    if node is None or x._base is not None or x._version != 0:
        return None
    kind = type(node).__name__
    if kind in ("GeluBackward0", "SiluBackward0"):
        u = _saved(node, "_saved_self")
        if u is None or u.shape != x.shape or u.dtype != x.dtype:
            return None
        if kind == "SiluBackward0":
            return F.silu, (u,)
        approximate = getattr(node, "_saved_approximate", "none")
        return functools.partial(F.gelu, approximate=approximate), (u,)
    if kind == "MulBackward0":
        a, b = _saved(node, "_saved_self"), _saved(node, "_saved_other")
        if a is None or b is None or a.shape != x.shape or b.shape != x.shape \
                or a.dtype != x.dtype or b.dtype != x.dtype:
            return None
        return torch.mul, (a, b)
    return None


def save_input(ctx, x: torch.Tensor, needed: bool) -> tuple[torch.Tensor | None, ...]:
    """The tensors to hand ``ctx.save_for_backward`` (last) for x: the rebuild's inputs when ``plan`` finds
    one, else ``(x,)``, or ``(None,)`` when backward does not need x. Pair with ``load_input``."""
    rebuild = plan(x) if needed else None
    ctx.rebuild_op = None if rebuild is None else rebuild[0]
    return (x if needed else None,) if rebuild is None else rebuild[1]


def load_input(ctx, saved: list[torch.Tensor | None]) -> torch.Tensor | None:
    """x in backward, from what ``save_input`` returned (rebuilt here when it was not saved)."""
    return saved[0] if ctx.rebuild_op is None else ctx.rebuild_op(*saved)
