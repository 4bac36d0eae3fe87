"""Mixed-adapter batches: one adapter (or ``"__base__"``) per batch row, computed batched in each ``DeltaLayer``.

Row ``i`` uses slot ``k(i)`` of the layer (slot 0 = no delta: the base, or an adapter that does not touch the
layer). Per layer, every batchable adapter is stacked once (zero-padded to the largest rank, slot 0 all zero):

* LoRA / rsLoRA / AsyLoRA / PiSSA (``LoraLinear``): ``y_i = out_i + (x_i A_k^T)(s_k B_k)^T`` with
  ``A`` [n+1, r_max, in], ``sB`` [n+1, out, r_max]: two ``bmm`` over the gathered per-row factors, or, when
  rows are short (decode steps), two dense matmuls over the used adapters' factors side by side with each row's
  features outside its own block zeroed (``_lowrank_dense``);
* DoRA (``DoraLinear``; ``out`` is the bare base output in a mixed batch):
  ``y_i = g_k * (out_i + L_i) + (1 - g_k) * b`` with ``g = m / ||W0 + s B A||`` per output row, ``g = 1`` for
  every other slot, so non-DoRA rows stay exactly ``out_i + L_i``;
* MoRA (``MoraLinear``), grouped by (r_hat, type, in, out): ``decompress(compress(x_i) M_k^T)`` with the square
  matrices stacked [n+1, r_hat, r_hat] (zero outside the group) and applied per row by batched matmul;
* LoRA on embeddings (``LoraEmbedding``): ``(A_k^T)[ids_i] (s_k B_k^T)`` with ``A^T`` stacked [n+1, vocab, r_max].

Zero padding adds exact zeros, so each row equals its single-adapter run up to float summation order.
Everything else (bottleneck adapters, conv LoRA, embeddings with ``max_norm``, unknown delta classes) runs once per
distinct adapter on its rows (index select), after the batched part; so does a whole layer while a delta with
active dropout is used (training), since dropout masks are random anyway.
Stacks are cached on the layer, keyed on the adapters' names and identities; each call also checks the storage and
version counters of the tensors of the adapters it uses (and the base weight when a DoRA row is in it), so an
optimizer step, ``load``, ``delete_adapter`` or a base weight edit invalidates them at the next use while unused
adapters cost nothing per call; while gradients flow into an adapter the stacks are rebuilt on every call
(differentiable).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MergeError
from ..layers import BASE, DeltaLayer, row_names


def batch_kind(delta: nn.Module, layer: DeltaLayer) -> str | None:
    """How a delta joins the batched path: its protocol ``batch_kind`` ("lowrank", "dora", "mora", "embedding"), or
    None (per-adapter loop). Embedding LoRA with ``max_norm`` renormalises rows it looks up: looped."""
    kind = delta.batch_kind
    if kind == "embedding" and getattr(layer.base_layer, "max_norm", None) is not None:
        return None
    return kind


def _dropping(delta: nn.Module) -> bool:
    return delta.dropout_p() > 0


@dataclass
class Stacks:
    """Per-layer stacked adapter tensors (slot 0 = zero) and the last row-index tensor built from them."""

    key: tuple  # (name, weak reference to the delta) of every adapter of the layer
    slots: dict[str, int]
    dtype: torch.dtype
    states: dict[str, tuple] = field(default_factory=dict)  # tensor states of each stacked adapter at build time
    base_state: tuple | None = None  # the base weight's state (DoRA's g depends on it)
    dora: frozenset[str] = frozenset()
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None  # A [n+1, r, in], sB [n+1, out, r]
    gain: torch.Tensor | None = None  # DoRA g [n+1, out], ones for other slots
    mora: list[tuple[nn.Module, torch.Tensor]] = field(default_factory=list)  # (representative, M [n+1, r, r])
    embedding: tuple[torch.Tensor, torch.Tensor] | None = None  # A^T [n+1, vocab, r], (sB)^T [n+1, r, dim]
    lowrank_t: torch.Tensor | None = None  # (sB)^T [n+1, r, out], for the few-token path
    index: tuple | None = None  # (rows, slot per row, used slots [u], one-hot [batch, u])

    def row_index(self, rows: list[str], device: torch.device) -> torch.Tensor:
        key = tuple(rows)
        if self.index is None or self.index[0] != key or self.index[1].device != device:
            slots = [self.slots.get(r, 0) for r in rows]
            used = sorted(set(slots))
            onehot = torch.zeros(len(rows), len(used), device=device, dtype=self.dtype)
            onehot[torch.arange(len(rows)), torch.tensor([used.index(k) for k in slots])] = 1
            index = torch.tensor(slots, dtype=torch.long, device=device)
            self.index = (key, index, torch.tensor(used, dtype=torch.long, device=device), onehot)
        return self.index[1]

    def used_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[A_u1; ...]`` [u*r, in], ``[(sB)_u1^T; ...]`` [u*r, out] of the slots used by the rows of the last
        ``row_index`` call, and each row's one-hot over them [batch, u] (cached with the row index)."""
        assert self.index is not None and self.lowrank is not None and self.lowrank_t is not None
        if len(self.index) == 4:
            used, (a, b_t) = self.index[2], (self.lowrank[0], self.lowrank_t)
            a_used = a.index_select(0, used).reshape(-1, a.shape[2])
            b_used = b_t.index_select(0, used).reshape(-1, b_t.shape[2])
            self.index = (*self.index, a_used, b_used)
        return self.index[4], self.index[5], self.index[3]


def _tensor_state(tensor: torch.Tensor) -> tuple:
    return tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device


def _delta_state(delta: nn.Module) -> tuple:
    """Storage and version of a delta's tensors (its own and its direct children's) and its scaling."""
    state: list[Any] = [delta.__dict__.get("scaling")]
    for tensor in delta._parameters.values():
        if tensor is not None:
            state += (tensor.data_ptr(), tensor._version)
    for child in delta._modules.values():
        if child is not None:
            for tensor in child._parameters.values():
                if tensor is not None:
                    state += (tensor.data_ptr(), tensor._version)
    return tuple(state)


def _base_state(layer: DeltaLayer) -> tuple:
    weight = layer._parameters.get("weight")
    return (_tensor_state(weight) if weight is not None else None), tuple(layer.merged)


def _same_adapters(key: tuple, adapters: dict[str, nn.Module]) -> bool:
    """The layer still holds exactly the delta objects the stacks were built from (weak references: an id is never
    mistaken for that of a deleted adapter)."""
    return len(key) == len(adapters) and all(
        name == other and ref() is delta for (name, ref), (other, delta) in zip(key, adapters.items())
    )


def _fresh(stacks: Stacks, layer: DeltaLayer, used: list[str]) -> bool:
    """Whether the cached stacks still hold the current tensors of every adapter this call uses."""
    adapters = layer.adapters._modules
    for name in used:
        state = stacks.states.get(name)
        if state is not None and state != _delta_state(adapters[name]):
            return False
    if any(name in stacks.dora for name in used):
        return stacks.base_state == _base_state(layer)
    return True


def _stack(tensors: list[torch.Tensor], slots: list[int], n: int, like: torch.Tensor) -> torch.Tensor:
    """[n+1, *shape] with ``tensors[j]`` at ``slots[j]`` and zeros elsewhere (differentiable)."""
    zero = torch.zeros_like(like)
    by_slot = dict(zip(slots, tensors))
    return torch.stack([by_slot.get(k, zero) for k in range(n + 1)])


def _pad(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad ``tensor`` along ``dim`` (0 or 1 of a 2-D tensor) up to ``size``."""
    extra = size - tensor.shape[dim]
    if extra == 0:
        return tensor
    return F.pad(tensor, (0, extra) if dim == 1 else (0, 0, 0, extra))


def build_stacks(layer: DeltaLayer, entries: list[tuple[str, nn.Module, str]], key: tuple) -> Stacks:
    """Stack every batchable adapter of ``layer`` (see the module doc for the layout of each kind)."""
    slots = {name: k + 1 for k, (name, _, _) in enumerate(entries)}
    n = len(entries)
    first = next(iter(entries[0][1].parameters()))
    stacks = Stacks(key=key, slots=slots, dtype=first.dtype, states={name: _delta_state(d) for name, d, _ in entries})
    low = [(slots[nm], d) for nm, d, kind in entries if kind in ("lowrank", "dora")]
    if low:
        r_max = max(d.lora_A.weight.shape[0] for _, d in low)
        a = [_pad(d.lora_A.weight, 0, r_max) for _, d in low]
        b = [_pad(d.lora_B.weight * d.scaling, 1, r_max) for _, d in low]
        ks = [k for k, _ in low]
        stacks.lowrank = (_stack(a, ks, n, a[0]), _stack(b, ks, n, b[0]))
        stacks.lowrank_t = stacks.lowrank[1].transpose(1, 2).contiguous()
    dora = [(slots[nm], d) for nm, d, kind in entries if kind == "dora"]
    if dora:
        stacks.dora = frozenset(nm for nm, _, kind in entries if kind == "dora")
        stacks.base_state = _base_state(layer)
        gains = [d.lora_magnitude_vector / d.weight_norm(layer).to(d.lora_magnitude_vector.dtype) for _, d in dora]
        ones = torch.ones_like(gains[0])
        by_slot = dict(zip([k for k, _ in dora], gains))
        stacks.gain = torch.stack([by_slot.get(k, ones) for k in range(n + 1)])
    groups: dict[tuple, list[tuple[int, nn.Module]]] = {}
    for nm, d, kind in entries:
        if kind == "mora":
            groups.setdefault((d.r_hat, d.mora_type, d.in_features, d.out_features), []).append((slots[nm], d))
    for members in groups.values():
        m = [d.mora_M.weight for _, d in members]
        stacks.mora.append((members[0][1], _stack(m, [k for k, _ in members], n, m[0])))
    emb = [(slots[nm], d) for nm, d, kind in entries if kind == "embedding"]
    if emb:
        r_max = max(d.lora_embedding_A.shape[0] for _, d in emb)
        a = [_pad(d.lora_embedding_A.T, 1, r_max) for _, d in emb]
        b = [_pad((d.lora_embedding_B * d.scaling).T, 0, r_max) for _, d in emb]
        ks = [k for k, _ in emb]
        stacks.embedding = (_stack(a, ks, n, a[0]), _stack(b, ks, n, b[0]))
    return stacks


def layer_stacks(layer: DeltaLayer, used: list[str], need_grad: bool) -> Stacks | None:
    """The layer's stacks (cached unless gradients must flow into them); None when nothing is batchable."""
    adapters = layer.adapters._modules
    cached: Stacks | None = layer.__dict__.get("_mixed_stacks")
    if not need_grad and cached is not None and _same_adapters(cached.key, adapters) and _fresh(cached, layer, used):
        return cached
    key = tuple((name, weakref.ref(d)) for name, d in adapters.items())
    entries = [(name, d, kind) for name, d in adapters.items() if (kind := batch_kind(d, layer)) is not None]
    if not entries:
        return None
    if need_grad:
        return build_stacks(layer, entries, key)
    layer.__dict__["_mixed_stacks"] = None  # free the old stacks before building new ones
    with torch.no_grad():
        stacks = build_stacks(layer, entries, key)
    layer.__dict__["_mixed_stacks"] = stacks
    return stacks


# tokens per row x adapters used up to which the dense path beats gathering per-row factors: measured per layer on
# CPU for 32 rows x 1 token (hidden 256 and 1024, r 8): dense is 2-4x faster at 4-8 adapters, even at 16, and
# about 2x slower at 32 (it does u times the LoRA FLOPs; gathering copies each row's factors once)
FEW_TOKENS = 16


def _lowrank_dense(xs: torch.Tensor, out: torch.Tensor, stacks: Stacks) -> torch.Tensor:
    """``out + (x_i A_u^T * e_i) (sB)_u^T`` with the u used adapters' factors side by side.

    ``h = x [A_1; ...; A_u]^T`` holds every used adapter's r features; multiplying by the row's one-hot zeroes
    every block but its own (exact zeros), so ``h [sB_1^T; ...; sB_u^T]`` adds only the row's own delta. Costs u
    times the LoRA FLOPs of a row but no per-row copy of the factors: the cheaper choice for few tokens per row.
    """
    a_used, b_used, onehot = stacks.used_factors()
    batch, tokens, features = xs.shape
    u = onehot.shape[1]
    h = (xs.reshape(-1, features) @ a_used.T).view(batch, tokens, u, -1)
    h.mul_(onehot.view(batch, 1, u, 1))
    return torch.addmm(out.reshape(batch * tokens, -1), h.view(batch * tokens, -1), b_used)


def apply_stacks(layer: DeltaLayer, stacks: Stacks, index: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` plus each row's batched delta (see the module doc)."""
    batch, dtype = x.shape[0], stacks.dtype
    total = out.to(dtype)
    if stacks.lowrank is not None:
        a, b = stacks.lowrank
        xs = x.to(dtype).reshape(batch, -1, x.shape[-1])
        if xs.shape[1] * stacks.index[2].shape[0] <= FEW_TOKENS:  # decode steps: dense matmuls over the used
            total = _lowrank_dense(xs, total, stacks).reshape(out.shape)
        else:  # long rows: gather each row's factors, two bmm
            h = torch.bmm(xs, a[index].transpose(1, 2))  # [batch, tokens, r]
            total = total + torch.bmm(h, b[index].transpose(1, 2)).reshape(out.shape)
    for delta, m in stacks.mora:
        xs = x.to(dtype).reshape(batch, -1, x.shape[-1])
        rows = m[index]
        rows = rows[:, None] if delta.mora_type == 6 else rows  # type 6 applies M to [batch, tokens, chunks, r]
        total = total + delta.update(xs, rows).reshape(out.shape)
    if stacks.embedding is not None:
        a_t, b_t = stacks.embedding
        ids = x.reshape(batch, -1)
        after_a = a_t[index[:, None], ids]  # [batch, tokens, r]
        total = total + torch.bmm(after_a, b_t[index]).reshape(out.shape)
    if stacks.gain is not None:
        g = stacks.gain[index].reshape(batch, *([1] * (out.dim() - 2)), -1)
        bias = layer._parameters.get("bias")
        total = g * total if bias is None else torch.addcmul(bias.to(dtype) * (1 - g), g, total)
    return total.to(out.dtype)


def _single(layer: DeltaLayer, delta: nn.Module, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """One delta on rows that all chose it; ``out`` is their base output (None for a delta that transforms the
    layer's input: it gets the base output of the transformed input instead)."""
    if delta.transforms_input:
        out = layer.base_layer(delta.transform_input(x, layer))
    return layer.apply_delta(delta, x, out)


def run_each(layer: DeltaLayer, x: torch.Tensor, out: torch.Tensor, rows: list[str], names: list[str]) -> torch.Tensor:
    """Each adapter in ``names`` runs once on the rows that asked for it (index select)."""
    result = out.clone()
    for name in names:
        index = torch.tensor([i for i, r in enumerate(rows) if r == name], device=x.device)
        result[index] = _single(layer, layer.adapters[name], x[index], out[index])
    return result


def forward_mixed(layer: DeltaLayer, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``DeltaLayer`` output for a mixed batch: row i gets only the delta of adapter ``layer.row_adapters[i]``.
    ``base()`` computes the base layer's output for the whole batch (called only when some row needs it)."""
    rows = row_names(layer.row_adapters, x.shape[0])
    if layer.merged:
        raise MergeError("mixed-adapter batches need unmerged weights; call model.unmerge() first")
    adapters = layer.adapters._modules
    used = [name for name in dict.fromkeys(rows) if name != BASE and name in adapters]
    if not used:
        return base()
    deltas = [adapters[name] for name in used]
    if len(used) == 1 and all(r == used[0] for r in rows):  # one adapter for every row: its own forward
        return _single(layer, deltas[0], x, None if deltas[0].transforms_input else base())
    out = base()
    if layer.training and any(_dropping(d) for d in deltas):
        return run_each(layer, x, out, rows, used)
    need_grad = torch.is_grad_enabled() and any(p.requires_grad for d in deltas for p in d.parameters())
    stacks = layer_stacks(layer, used, need_grad)
    batched = [name for name in used if stacks is not None and name in stacks.slots]
    if batched:
        out = apply_stacks(layer, stacks, stacks.row_index(rows, x.device), x, out)
    others = [name for name in used if name not in batched]
    return run_each(layer, x, out, rows, others) if others else out
