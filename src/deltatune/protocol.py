"""The delta protocol: what a method's per-layer module must provide, and the registries through which upper layers
(kernels, batching, quantization, io, adapter arithmetic) plug into the core without the core importing them.

A *delta* is one adapter's module inside one adapted layer (``DeltaLayer.adapters[name]``). For an input ``x`` the
host computes, over its active, unmerged deltas::

    x'  = t_k(... t_1(x))          deltas with transforms_input (IA3 on FFN inputs, OFT), in active order
    out = base(x')
    out = d(x, out, layer)         additive deltas (LoRA family), in active order
    out = d(x, out, layer)         deltas with transforms_output (bottleneck adapters), last

Everything a delta may take part in is declared here, with its default; code outside a method reads these
attributes and calls these methods, never a method's class name:

* ``forward(x, out, layer) -> out``: the formula, in plain PyTorch (the reference every kernel is tested against);
* ``transform_input(x, layer) -> x'`` when ``transforms_input``; ``transforms_output`` orders output transforms last;
* ``delta_weight(layer) -> dW`` (float32, the layout of ``layer.weight``) when ``mergeable``; ``merge_into`` /
  ``unmerge_from`` edit ``layer.weight_for_merge`` in place (``MergeableDelta`` derives both from ``delta_weight``);
* ``low_rank_factors() -> (B, A)`` when ``dW = s B A`` exactly (adapter combination and hot-swap use it), else None;
* ``row_stackers``: the ``RowStacker`` classes that compute this delta stacked with other adapters' deltas of the
  layer in mixed-adapter batches (empty: the batch runs the delta once per adapter on its rows, which is always
  exact); see "row stackers" below;
* ``param_roles()``: parameter name -> role for optimizers ("A" / "B": input / output factor of a product, which
  LoRA+ gives different learning rates; "A_embedding" / "B_embedding" for embedding factors; "magnitude");
* ``restartable`` / ``restart()``: ReLoRA merges ``delta_weight`` into the base, then ``restart()`` re-initialises the
  delta so that its ``delta_weight`` is zero again;
* file tensors: the delta's ``state_dict`` keys, under the layer's path, are its keys in the adapter file
  (``...query.lora_A.weight``); ``DeltaConfig.file_prefix`` / ``file_root_keys`` adjust the prefix;
* ``shared_tensors() -> {file key: tensor}``: adapter-level tensors that all deltas of one adapter use, one object
  for all of them (VeRA's frozen random projections), keyed as in the file (a key in ``file_root_keys`` is written
  as it is, others get the prefix). Every delta returns the same live tensors under the same keys, so the file holds
  each once; io saves them and loads into them like per-layer tensors. Keep them out of the delta's ``state_dict``
  (e.g. non-persistent buffers of a child module all the deltas share), or each layer would save its own copy.

Building for a caller to fill (``DeltaModel.add_adapter(name, config, init=False)``; ``deltatune.io.load`` does it):
inside ``no_init()`` a constructor skips its initialisation (``initialising()`` is False) and every tensor an adapter
file holds is created on the meta device, the default there, so it costs neither memory nor time until
``deltatune.filling.fill`` gives it the file's value. A tensor no file holds that a delta computes when it is built
(MoRA's rotation tables, VeRA's projections drawn from the seed when the file has none) is built with an explicit
real ``device=`` and computed as usual; one left on the meta device by mistake makes the load fail, naming it.

A delta gets what it needs as arguments (``x``, ``out``, ``layer``); the host's own state it may read is
``layer.weight_for_merge`` and ``layer.base_layer``, and ``layer.only_delta(self)``: whether ``out`` is the bare base
output (no other delta has changed it), which DoRA's rescaling needs.

Row stackers (mixed-adapter batches, ``model(..., adapter_names=[...])``: row i uses adapter a(i) alone). A method
may give its deltas a batched path without editing ``deltatune.batching``: a ``RowStacker`` subclass listed in the
delta class's ``row_stackers``. Per layer, ``deltatune.batching`` numbers the layer's stackable adapters 1..n (slot
0 = no delta: base rows, and adapters that do not touch the layer), groups the deltas by ``(stacker,
stacker.group_key(delta, layer))``, and calls ``build(layer, members, n_slots)`` once per group with the group's
``(slot, delta)`` pairs; the result (the *state*: stacked tensors, slot 0 and every slot outside the group holding
the identity, i.e. zero for an additive term, one for a gain) is cached on the layer. Each call then runs::

    x'    = transform(state, layer, rows, x)       stackers with phase "input", in group order   (identity rows: x)
    out   = base(x')                               one base pass for the whole batch
    total = apply(state, layer, rows, x, total)    phase "add" (additive terms, from the original x), then "after"
                                                   (gains on the sum: DoRA's g, IA3's output scaling)

``rows`` (``RowIndex``) holds each row's slot. Because a row has one adapter and every other group holds the identity
at that row's slot, each row equals its single-adapter run up to float summation order. A stacker's state is
rebuilt when the layer's adapters change, when an adapter the batch uses changed (storage or version of the
tensors of the delta and its direct children, or one of the plain attributes its stackers name in
``attributes``), or when ``layer_state(layer)`` changed (DoRA: the base weight); while gradients flow into the
adapters it is built on every call, differentiably.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import DeltatuneError


class Delta(nn.Module):
    """Base of every per-layer delta: the protocol's defaults (see the module docstring)."""

    transforms_input: ClassVar[bool] = False
    transforms_output: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    row_stackers: ClassVar[tuple[type[RowStacker], ...]] = ()
    restartable: ClassVar[bool] = False

    def forward(self, x: torch.Tensor, out: torch.Tensor, layer: Any) -> torch.Tensor:
        """The updated layer output; input-transforming deltas return ``out`` (their work is ``transform_input``)."""
        return out

    def transform_input(self, x: torch.Tensor, layer: Any) -> torch.Tensor:
        return x

    def delta_weight(self, layer: Any) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is not a weight update")

    def merged_weight(self, layer: Any) -> torch.Tensor:
        """The float32 weight the layer would hold after merging: ``W0 + dW``."""
        weight = layer.weight_for_merge
        return weight.detach().float() + self.delta_weight(layer).to(weight.device)

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def param_roles(self) -> dict[str, str]:
        return {}

    def restart(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot restart")

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        """Adapter-level tensors this delta uses and shares with the adapter's other deltas, by file key (none)."""
        return {}

    def dropout_p(self) -> float:
        """The dropout probability in effect now: the ``dropout`` module's p in training mode, else 0."""
        dropout = self._modules.get("dropout")
        return dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0


def dropout_module(p: float) -> nn.Module:
    """The dropout a delta applies to its input: ``nn.Dropout(p)``, or the identity for p = 0 (``dropout_p`` reads it)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


# ---- building without initialisation -----------------------------------------------------------------------------
_BUILD = threading.local()  # per thread: a server may load an adapter while another thread builds one to train


def initialising() -> bool:
    """Whether deltas built now initialise their tensors: False inside ``no_init()``, where they are built for a
    caller to fill (see the module docstring)."""
    return getattr(_BUILD, "initialising", True)


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Build adapters for filling: ``initialising()`` is False, and factory calls without an explicit device create
    meta tensors (shapes and dtypes only: no memory is allocated and no initialiser computes anything)."""
    previous = initialising()
    _BUILD.initialising = False
    try:
        with torch.device("meta"):
            yield
    finally:
        _BUILD.initialising = previous


# ---- row stackers: optional batched paths for mixed-adapter batches (see the module docstring) ----------------------
@dataclass
class RowIndex:
    """The slot of every row of a mixed batch (slot 0: no delta), built once per row assignment and layer.

    ``slots`` [batch] and ``used`` [u] (the distinct slots, ascending) are long tensors on the input's device;
    ``slot_list`` / ``used_list`` are the same as Python lists. ``cache`` holds what a stacker derives from the
    assignment (LoRA's few-token path: the used adapters' factors side by side), keyed by ``id(state)``; a new
    assignment comes with a new, empty cache.
    """

    key: tuple
    slots: torch.Tensor
    used: torch.Tensor
    slot_list: list[int]
    used_list: list[int]
    cache: dict[Any, Any] = field(default_factory=dict)


class RowStacker:
    """A batched path for one family of deltas in mixed-adapter batches (``Delta.row_stackers``); stateless, every
    member is a classmethod, the stacked tensors are the *state* that ``build`` returns.

    phase: "input" (``transform`` rewrites the layer input before the one base pass: IA3 on FFN inputs), "add"
      (``apply`` adds each row's term to the running output, computed from the original input), "after" (``apply``
      runs after every "add" stacker, on the sum: DoRA's gain, IA3's output scaling).
    attributes: plain (non-tensor) attributes of a delta the state depends on (LoRA: ``scaling``); a change
      rebuilds the state like a change of the delta's tensors.
    A delta lists every stacker its formula needs; it is stacked only when each of them gives it a group key.
    """

    phase: ClassVar[str] = "add"
    attributes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def group_key(cls, delta: Delta, layer: Any) -> Hashable | None:
        """Deltas with equal keys share one state; None: not stackable on this layer (the per-adapter loop runs it)."""
        return ()

    @classmethod
    def build(cls, layer: Any, members: list[tuple[int, Delta]], n_slots: int) -> Any:
        """The state for ``members`` (``(slot, delta)``, slots in 1..n_slots-1): stacks of leading size ``n_slots``
        holding the identity at every other slot. Differentiable: it runs under ``torch.no_grad`` only when cached."""
        raise NotImplementedError(f"{cls.__name__} must build its state")

    @classmethod
    def apply(cls, state: Any, layer: Any, rows: RowIndex, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Phases "add" / "after": ``out`` [batch, ..., features] (the working dtype) with each row's term applied."""
        return out

    @classmethod
    def transform(cls, state: Any, layer: Any, rows: RowIndex, x: torch.Tensor) -> torch.Tensor:
        """Phase "input": each row's input transformed (same shape and dtype as ``x``)."""
        return x

    @classmethod
    def layer_state(cls, layer: Any) -> Hashable:
        """State of the host's own tensors that ``build`` read (DoRA: the base weight), None for none; compared
        before each use by a batch with rows of this stacker's groups."""
        return None


def tensor_state(tensor: torch.Tensor | None) -> tuple:
    """Storage, version, dtype and device of a tensor: equal as long as nobody wrote to or replaced it."""
    if tensor is None:
        return ()
    return tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device


def stack_slots(members: list[tuple[int, torch.Tensor]], n_slots: int, fill: float = 0.0) -> torch.Tensor:
    """[n_slots, *shape]: each member's tensor at its slot, the identity value ``fill`` (0 for a term, 1 for a gain)
    everywhere else (differentiable)."""
    by_slot = dict(members)
    identity = torch.full_like(members[0][1], fill)
    return torch.stack([by_slot.get(k, identity) for k in range(n_slots)])


def pad_to(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad ``tensor`` along ``dim`` (0 or 1 of a 1-D or 2-D tensor) up to ``size``: exact zeros, which add
    nothing to a product (how stacks of different ranks share one shape)."""
    extra = size - tensor.shape[dim]
    if extra == 0:
        return tensor
    return torch.nn.functional.pad(tensor, (0, extra) if dim == tensor.dim() - 1 else (0, 0, 0, extra))


# ---- kernels: optional fast paths per delta type ------------------------------------------------------------------
# A kernel computes exactly what the delta's forward computes (tests compare them); "fused" computes the whole layer
# output base(x) + delta in one op and may return None to decline, "add" replaces ``forward(x, out, layer)``.
_KERNELS: dict[type, dict[str, Callable[..., Any]]] = {}
_KERNELS_ON = [os.environ.get("DELTATUNE_KERNELS", "1").strip().lower() not in ("0", "off", "false", "no")]


def register_kernel(delta_type: type, kind: str, function: Callable[..., Any]) -> None:
    """Register ``function`` as the ``kind`` ("fused" or "add") kernel of exactly ``delta_type``."""
    if kind not in ("fused", "add"):
        raise ValueError(f"kernel kind must be 'fused' or 'add', got {kind!r}")
    _KERNELS.setdefault(delta_type, {})[kind] = function


def kernel(delta: nn.Module, kind: str) -> Callable[..., Any] | None:
    """The registered kernel for ``delta``'s exact type (a subclass may change the formula), when kernels are on."""
    if not _KERNELS_ON[0]:
        return None
    return _KERNELS.get(type(delta), {}).get(kind)


def set_kernels(enabled: bool) -> bool:
    """Turn every registered kernel on or off (the plain formulas run when off); returns the previous setting."""
    previous = _KERNELS_ON[0]
    _KERNELS_ON[0] = bool(enabled)
    return previous


def kernels_enabled() -> bool:
    return _KERNELS_ON[0]


# ---- strategies: behaviour the core needs from the layers above it --------------------------------------------------
_STRATEGIES: dict[str, Callable[..., Any]] = {}
_PROVIDERS = {
    "mixed_forward": "deltatune.batching", "mixed_virtual_tokens": "deltatune.batching",
    "dequantize": "deltatune.quant", "requantize": "deltatune.quant", "dequantize_model": "deltatune.quant",
    "save": "deltatune.io", "load": "deltatune.io",
    "add_weighted_adapter": "deltatune.combine", "prepare_for_hotswap": "deltatune.hotswap",
    "hotswap_adapter": "deltatune.hotswap",
}


def register_strategy(name: str, function: Callable[..., Any]) -> None:
    """Install the implementation of ``name`` (one of ``_PROVIDERS``); the providing module does it on import."""
    if name not in _PROVIDERS:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(_PROVIDERS)}")
    _STRATEGIES[name] = function


def strategy(name: str) -> Callable[..., Any]:
    """The installed implementation of ``name``; ``import deltatune`` installs all of them."""
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise DeltatuneError(
            f"{name} is provided by {_PROVIDERS.get(name, 'an upper layer')}, which is not imported; "
            f"`import deltatune` installs every provider"
        ) from None
