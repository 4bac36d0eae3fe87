"""Mixed-adapter batches: one adapter (or ``"__base__"``) per batch row, computed batched in each ``DeltaLayer``.

Row ``i`` uses slot ``k(i)`` of the layer (slot 0 = no delta: the base, or an adapter that does not touch the
layer). Per layer, every adapter whose delta lists row stackers (``Delta.row_stackers``, ``deltatune.protocol``)
gets a slot; its deltas are grouped by ``(stacker, stacker.group_key(delta, layer))`` and each group is stacked
once by ``stacker.build`` (slot 0 and the slots outside the group hold the identity). A call then computes::

    x'  = t_g(... t_1(x))          "input" stackers: x'_i = t_k(i)(x_i), the identity for every other row
    out = base(x')                 one base pass for the whole batch
    out = a_g(x, out)              "add" stackers: out_i + delta_k(i)(x_i), exact zeros for every other row
    out = a_g(x, out)              "after" stackers: gains on the sum, exactly one for every other row

in one running output in the working dtype (the first stacked adapter's), cast back once at the end; a group no
row uses is skipped (it is the identity on every row). The formulas, and the choice between per-row gathers and
dense products, live with the methods, in their stackers (``docs/ARCHITECTURE.md`` lists them): this module only
numbers the slots, groups, caches and dispatches, and names no method. Since a row has one adapter and every other
group is the identity at its slot, each row equals its single-adapter run up to float summation order.
Everything without stackers (bottleneck adapters, conv LoRA, LoHa/LoKr, OFT, unknown delta classes) and every
delta a stacker refuses on its layer (``group_key`` None) runs once per distinct adapter on its rows (index
select), after the batched part; so does a whole layer while a delta with active dropout is used (training), since
dropout masks are random anyway.
Stacks are cached on the layer, keyed on the adapters' names and identities; each call also checks, for the
adapters it uses, the storage and version counters of their tensors (the delta's and its direct children's
parameters and buffers) and the plain attributes their stackers name, and each used group's ``layer_state``
(e.g. a base weight the state was computed from). So an optimizer step, ``load``, ``delete_adapter`` or a base
weight edit invalidates them at the next use, while unused adapters cost nothing per call. While gradients flow
into an adapter the stacks are rebuilt on every call (differentiable).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import MergeError
from ..layers import BASE, DeltaLayer, row_names
from ..protocol import RowIndex, RowStacker

PHASES = ("input", "add", "after")


def stackers(delta: nn.Module, layer: DeltaLayer) -> list[tuple[type[RowStacker], Hashable]] | None:
    """``(stacker, group key)`` for each stacker of ``delta``, or None when it runs in the per-adapter loop (no
    stackers, or one of them refuses this layer)."""
    found = []
    for stacker in delta.row_stackers:
        key = stacker.group_key(delta, layer)
        if key is None:
            return None
        found.append((stacker, key))
    return found or None


def _dropping(delta: nn.Module) -> bool:
    return delta.dropout_p() > 0


@dataclass
class Stacks:
    """Per-layer stacked adapter states (one per group, in phase order) and the last row index built from them."""

    key: tuple  # (name, weak reference to the delta) of every adapter of the layer
    slots: dict[str, int]
    dtype: torch.dtype  # the working dtype of the batched part: the first stacked adapter's
    states: dict[str, tuple] = field(default_factory=dict)  # tensor states of each stacked adapter at build time
    attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # plain attributes each adapter's state reads
    groups: list[tuple[type[RowStacker], Any, frozenset[int]]] = field(default_factory=list)  # (stacker, state,
    # slots of its members), in phase order
    watched: list[tuple[type[RowStacker], frozenset[str], Hashable]] = field(default_factory=list)  # layer states
    index: RowIndex | None = None

    def row_index(self, rows: list[str], device: torch.device) -> RowIndex:
        """The slot of each row (cached while the rows and the device stay the same)."""
        key = (tuple(rows), device)
        if self.index is None or self.index.key != key:
            slots = [self.slots.get(r, 0) for r in rows]
            used = sorted(set(slots))
            self.index = RowIndex(
                key, torch.tensor(slots, dtype=torch.long, device=device),
                torch.tensor(used, dtype=torch.long, device=device), slots, used,
            )
        return self.index


def _delta_state(delta: nn.Module, attributes: tuple[str, ...]) -> tuple:
    """Storage and version of a delta's tensors (its own and its direct children's parameters and buffers) and the
    values of its named plain attributes. Runs per used adapter and layer on every call: kept to plain loops."""
    values = delta.__dict__
    state: list[Any] = []
    for name in attributes:  # a loop, not a comprehension: cheaper for the usual zero or one name
        state.append(values.get(name))
    for tensor in delta._parameters.values():
        if tensor is not None:
            state += (tensor.data_ptr(), tensor._version)
    for child in delta._modules.values():
        if child is not None:
            for tensor in child._parameters.values():
                if tensor is not None:
                    state += (tensor.data_ptr(), tensor._version)
            if child._buffers:  # e.g. VeRA's shared projections
                for tensor in child._buffers.values():
                    if tensor is not None:
                        state += (tensor.data_ptr(), tensor._version)
    return tuple(state)


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
        if state is not None and state != _delta_state(adapters[name], stacks.attributes[name]):
            return False
    for stacker, names, state in stacks.watched:  # host tensors a state read (DoRA: the base weight)
        if not names.isdisjoint(used) and stacker.layer_state(layer) != state:
            return False
    return True


def build_stacks(layer: DeltaLayer, entries: list[tuple[str, nn.Module, list]], key: tuple) -> Stacks:
    """Number the stackable adapters 1..n, group their deltas and build each group's state (see the module doc)."""
    slots = {name: k + 1 for k, (name, _, _) in enumerate(entries)}
    first = next(iter(entries[0][1].parameters()))
    stacks = Stacks(key=key, slots=slots, dtype=first.dtype)
    groups: dict[tuple, list[tuple[int, nn.Module]]] = {}
    for name, delta, found in entries:
        stacks.attributes[name] = tuple(dict.fromkeys(a for stacker, _ in found for a in stacker.attributes))
        stacks.states[name] = _delta_state(delta, stacks.attributes[name])
        for stacker, group in found:
            groups.setdefault((stacker, group), []).append((slots[name], delta))
    names = {slot: name for name, slot in slots.items()}
    for stacker, group in sorted(groups, key=lambda g: PHASES.index(g[0].phase)):  # stable within a phase
        members = groups[stacker, group]
        state = stacker.build(layer, members, len(entries) + 1)
        stacks.groups.append((stacker, state, frozenset(slot for slot, _ in members)))
        host_state = stacker.layer_state(layer)
        if host_state is not None:
            stacks.watched.append((stacker, frozenset(names[slot] for slot, _ in members), host_state))
    return stacks


def layer_stacks(layer: DeltaLayer, used: list[str], need_grad: bool) -> Stacks | None:
    """The layer's stacks (cached unless gradients must flow into them); None when nothing is stackable."""
    adapters = layer.adapters._modules
    cached: Stacks | None = layer.__dict__.get("_mixed_stacks")
    if not need_grad and cached is not None and _same_adapters(cached.key, adapters) and _fresh(cached, layer, used):
        return cached
    key = tuple((name, weakref.ref(d)) for name, d in adapters.items())
    entries = [(name, d, found) for name, d in adapters.items() if (found := stackers(d, layer)) is not None]
    if not entries:
        return None
    if need_grad:
        return build_stacks(layer, entries, key)
    layer.__dict__["_mixed_stacks"] = None  # free the old stacks before building new ones
    with torch.no_grad():
        stacks = build_stacks(layer, entries, key)
    layer.__dict__["_mixed_stacks"] = stacks
    return stacks


def apply_stacks(
    layer: DeltaLayer, stacks: Stacks, rows: RowIndex, x: torch.Tensor, base: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The layer output with each row's stacked delta: input transforms, one base pass, then every "add" and
    "after" group on one running output in the working dtype (one cast back at the end, as a single delta's
    forward does)."""
    groups = [(stacker, state) for stacker, state, slots in stacks.groups if not slots.isdisjoint(rows.used_list)]
    inner = x  # a group no row uses is the identity on every row: skipped
    for stacker, state in groups:
        if stacker.phase == "input":
            inner = stacker.transform(state, layer, rows, inner)
    out = base(inner)
    total = out.to(stacks.dtype)
    for stacker, state in groups:
        if stacker.phase != "input":
            total = stacker.apply(state, layer, rows, x, total)
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


def forward_mixed(layer: DeltaLayer, x: torch.Tensor, base: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``DeltaLayer`` output for a mixed batch: row i gets only the delta of adapter ``layer.row_adapters[i]``.
    ``base(x)`` computes the base layer's output for a whole-batch input (called only when some row needs it)."""
    rows = row_names(layer.row_adapters, x.shape[0])
    if layer.merged:
        raise MergeError("mixed-adapter batches need unmerged weights; call model.unmerge() first")
    adapters = layer.adapters._modules
    used = [name for name in dict.fromkeys(rows) if name != BASE and name in adapters]
    if not used:
        return base(x)
    deltas = [adapters[name] for name in used]
    if len(used) == 1 and all(r == used[0] for r in rows):  # one adapter for every row: its own forward
        return _single(layer, deltas[0], x, None if deltas[0].transforms_input else base(x))
    if layer.training and any(_dropping(d) for d in deltas):
        return run_each(layer, x, base(x), rows, used)
    need_grad = torch.is_grad_enabled() and any(p.requires_grad for d in deltas for p in d.parameters())
    stacks = layer_stacks(layer, used, need_grad)
    batched = [name for name in used if stacks is not None and name in stacks.slots]
    if not batched:
        return run_each(layer, x, base(x), rows, used)
    out = apply_stacks(layer, stacks, stacks.row_index(rows, x.device), x, base)
    others = [name for name in used if name not in stacks.slots]
    return run_each(layer, x, out, rows, others) if others else out
