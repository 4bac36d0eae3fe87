"""LoRA's stacked paths for mixed-adapter batches (row stackers, ``deltatune.protocol``): row i uses adapter k(i).

* ``LowRankRows`` (``LoraLinear``: LoRA, rsLoRA, AsyLoRA, PiSSA; and DoRA's low-rank term):
  ``y_i = out_i + (x_i A_k^T)(s_k B_k)^T`` with ``A`` [n+1, r_max, in] and ``sB`` [n+1, out, r_max], zero-padded to
  the largest rank, slot 0 and non-members all zero. Long rows: two ``bmm`` over the gathered per-row factors.
  Short rows (decode steps; tokens per row x used slots <= ``FEW_TOKENS``): two dense matmuls over the used
  adapters' factors side by side, each row's features outside its own block zeroed (``_dense``).
* ``EmbeddingRows`` (``LoraEmbedding``): ``y_i = out_i + (A_k^T)[ids_i] (s_k B_k^T)`` with ``A^T`` stacked
  [n+1, vocab, r_max] and ``(sB)^T`` [n+1, r_max, dim]. An embedding with ``max_norm`` renormalises the rows it
  looks up, which a stacked lookup does not reproduce: refused there (the per-adapter loop runs it).

Zero padding adds exact zeros, so each row equals its single-adapter run up to float summation order. Both read
``scaling``, a plain attribute, so they list it in ``attributes`` (a changed scaling rebuilds the stacks).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from ..protocol import Delta, RowIndex, RowStacker, pad_to, stack_slots

# tokens per row x adapters used up to which the dense path beats gathering per-row factors: measured per layer on
# CPU for 32 rows x 1 token (hidden 256 and 1024, r 8): dense is 2-4x faster at 4-8 adapters, even at 16, and
# about 2x slower at 32 (it does u times the LoRA FLOPs; gathering copies each row's factors once)
FEW_TOKENS = 16


@dataclass
class LowRankState:
    a: torch.Tensor  # A [n+1, r, in]
    b: torch.Tensor  # sB [n+1, out, r]
    b_t: torch.Tensor  # (sB)^T [n+1, r, out], contiguous: the dense path's right factor


class LowRankRows(RowStacker):
    """``y_i = out_i + (x_i A_k^T)(s_k B_k)^T``, one stack for every ``lora_A`` / ``lora_B`` pair of the layer."""

    attributes = ("scaling",)

    @classmethod
    def build(cls, layer: Any, members: list[tuple[int, Delta]], n_slots: int) -> LowRankState:
        r_max = max(d.lora_A.weight.shape[0] for _, d in members)
        a = [(k, pad_to(d.lora_A.weight, 0, r_max)) for k, d in members]
        b = [(k, pad_to(d.lora_B.weight * d.scaling, 1, r_max)) for k, d in members]
        b_stack = stack_slots(b, n_slots)
        return LowRankState(stack_slots(a, n_slots), b_stack, b_stack.transpose(1, 2).contiguous())

    @classmethod
    def apply(cls, state: LowRankState, layer: Any, rows: RowIndex, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        xs = x.to(out.dtype).reshape(batch, -1, x.shape[-1])
        if xs.shape[1] * len(rows.used_list) <= FEW_TOKENS:  # decode steps: dense matmuls over the used adapters
            return _dense(xs, out, state, rows).reshape(out.shape)
        h = torch.bmm(xs, state.a[rows.slots].transpose(1, 2))  # long rows: gather each row's factors, [batch, tokens, r]
        return out + torch.bmm(h, state.b[rows.slots].transpose(1, 2)).reshape(out.shape)


def _used_factors(state: LowRankState, rows: RowIndex, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``[A_u1; ...]`` [u*r, in], ``[(sB)_u1^T; ...]`` [u*r, out] of the slots the rows use, and each row's one-hot
    over them [batch, u]; cached with the row index (they change only with the row assignment)."""
    cached = rows.cache.get(id(state))
    if cached is None:
        onehot = torch.zeros(len(rows.slot_list), len(rows.used_list), device=rows.slots.device, dtype=dtype)
        position = {slot: j for j, slot in enumerate(rows.used_list)}
        onehot[torch.arange(len(rows.slot_list)), torch.tensor([position[k] for k in rows.slot_list])] = 1
        a_used = state.a.index_select(0, rows.used).reshape(-1, state.a.shape[2])
        b_used = state.b_t.index_select(0, rows.used).reshape(-1, state.b_t.shape[2])
        cached = rows.cache[id(state)] = (a_used, b_used, onehot)
    return cached


def _dense(xs: torch.Tensor, out: torch.Tensor, state: LowRankState, rows: RowIndex) -> torch.Tensor:
    """``out + (x_i A_u^T * e_i) (sB)_u^T`` with the u used adapters' factors side by side.

    ``h = x [A_1; ...; A_u]^T`` holds every used adapter's r features; multiplying by the row's one-hot zeroes
    every block but its own (exact zeros), so ``h [sB_1^T; ...; sB_u^T]`` adds only the row's own delta. Costs u
    times the LoRA FLOPs of a row but no per-row copy of the factors: the cheaper choice for few tokens per row.
    """
    a_used, b_used, onehot = _used_factors(state, rows, xs.dtype)
    batch, tokens, features = xs.shape
    u = onehot.shape[1]
    h = (xs.reshape(-1, features) @ a_used.T).view(batch, tokens, u, -1)
    h.mul_(onehot.view(batch, 1, u, 1))
    return torch.addmm(out.reshape(batch * tokens, -1), h.view(batch * tokens, -1), b_used)


class EmbeddingRows(RowStacker):
    """``y_i = out_i + (A_k^T)[ids_i] (s_k B_k^T)``, one stack for every embedding LoRA of the layer."""

    attributes = ("scaling",)

    @classmethod
    def group_key(cls, delta: Delta, layer: Any) -> Hashable | None:
        return None if getattr(layer.base_layer, "max_norm", None) is not None else ()

    @classmethod
    def build(cls, layer: Any, members: list[tuple[int, Delta]], n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        r_max = max(d.lora_embedding_A.shape[0] for _, d in members)
        a = [(k, pad_to(d.lora_embedding_A.T, 1, r_max)) for k, d in members]
        b = [(k, pad_to((d.lora_embedding_B * d.scaling).T, 0, r_max)) for k, d in members]
        return stack_slots(a, n_slots), stack_slots(b, n_slots)

    @classmethod
    def apply(cls, state: tuple, layer: Any, rows: RowIndex, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a_t, b_t = state
        batch = x.shape[0]
        after_a = a_t[rows.slots[:, None], x.reshape(batch, -1)]  # [batch, tokens, r]
        return out + torch.bmm(after_a, b_t[rows.slots]).reshape(out.shape)
