"""Adapter hosts: modules that stand in place of a base module and add per-adapter behaviour.

A host is *transparent*: it shares the base module's ``_parameters`` and ``_buffers`` dicts, so the wrapped
model keeps the base's state-dict keys (``query.weight`` stays ``query.weight``), nothing is copied, and a
parameter replaced on the host (``load_state_dict(assign=True)``, FSDP) is replaced in the base module too.
The base module itself is kept outside the module tree (``host.base_layer``) and restored by ``unwrap()``.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .errors import MergeError
from .filling import empty_copy
from .protocol import initialising, kernel, strategy

BASE = "__base__"


class AdapterHost(nn.Module):
    """Common state of every host: which adapters exist, which are active, merged, disabled."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.__dict__["base_layer"] = base  # plain attribute: not a child, so its tensors are not listed twice
        self._parameters = base._parameters
        self._buffers = base._buffers
        self._non_persistent_buffers_set = base._non_persistent_buffers_set
        for child_name, child in base._modules.items():
            self._modules[child_name] = child
        self.active: tuple[str, ...] = ()
        self.disabled = False
        self.row_adapters: list[str] | None = None  # one adapter name (or "__base__") per batch row
        self.training = base.training

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("base_layer")
            if base is None:
                raise
            return getattr(base, name)

    def train(self, mode: bool = True) -> AdapterHost:
        super().train(mode)
        self.base_layer.train(mode)
        return self

    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def remove_adapter(self, name: str) -> None:
        raise NotImplementedError

    def adapter_module(self, name: str) -> nn.Module | None:
        """The module holding adapter ``name``'s tensors in this host (its delta, virtual tokens or module copy), or
        None when the adapter has none here."""
        raise NotImplementedError

    def file_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        """Adapter ``name``'s tensors under file keys the host chooses (model-level hosts such as virtual tokens),
        or None: the default layout (each adapter module's state dict under the host's path)."""
        return None

    def swap_base(self, new: nn.Module) -> None:
        """Put ``new`` in the base module's place (e.g. a dequantized copy of it); adapters stay."""
        old = self.base_layer
        for child_name in old._modules:
            self._modules.pop(child_name, None)
        self.__dict__["base_layer"] = new
        self._parameters = new._parameters
        self._buffers = new._buffers
        self._non_persistent_buffers_set = new._non_persistent_buffers_set
        for child_name, child in new._modules.items():
            self._modules[child_name] = child

    def unwrap(self) -> nn.Module:
        """Return the base module, holding the host's current parameters."""
        base = self.base_layer
        base._parameters = self._parameters
        base._buffers = self._buffers
        for child_name in base._modules:
            base._modules[child_name] = self._modules[child_name]
        base.train(self.training)
        return base


class DeltaLayer(AdapterHost):
    """``y = base(t(x)) + sum_{a active, not merged} delta_a(x)``; each ``delta_a`` lives in ``self.adapters[a]``.

    The order of the steps, and everything a delta provides, is the delta protocol (``deltatune.protocol``): input
    transforms first, then the base, then additive deltas, then output transforms (bottleneck adapters, which see the
    full, possibly merged, layer output whatever the order of the active adapters).
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.adapters = nn.ModuleDict()
        self.merged: list[str] = []
        self._dense_weight: torch.Tensor | None = None  # quantized bases: the dense weight a merge edits in place

    def adapter_names(self) -> list[str]:
        return list(self.adapters.keys())

    def adapter_module(self, name: str) -> nn.Module | None:
        return self.adapters[name] if name in self.adapters else None

    def remove_adapter(self, name: str) -> None:
        if name in self.merged:
            raise MergeError(f"adapter '{name}' is merged into the weights; call model.unmerge() before deleting it")
        if name in self.adapters:
            del self.adapters[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        deltas = [self.adapters[n] for n in self.active if n in self.adapters and n not in self.merged]
        if len(deltas) == 1 and not self.disabled and self.row_adapters is None and not args and not kwargs:
            fused = kernel(deltas[0], "fused")  # base + delta in one op (``deltatune.kernels``); None declines
            y = fused(deltas[0], x, self) if fused is not None else None
            if y is not None:
                return y
        if self.disabled or not deltas and self.row_adapters is None:
            return self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            return strategy("mixed_forward")(self, x, lambda inner: self.base_layer(inner, *args, **kwargs))
        inner = x
        for delta in deltas:
            if delta.transforms_input:
                inner = delta.transform_input(inner, self)
        out = self.base_layer(inner, *args, **kwargs)
        for delta in sorted(deltas, key=lambda d: d.transforms_output):
            out = self.apply_delta(delta, x, out)
        return out

    def apply_delta(self, delta: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """One delta's ``forward`` (or its registered "add" kernel)."""
        add = kernel(delta, "add")
        return add(delta, x, out, self) if add is not None else delta(x, out, self)

    def only_delta(self, delta: nn.Module) -> bool:
        """Whether ``out`` reaching ``delta`` is the bare base output of ``x``: no other unmerged delta transformed
        the input or ran before it (in a mixed batch each row has one adapter, so always)."""
        if self.row_adapters is not None:
            return True
        others = [self.adapters[n] for n in self.active if n in self.adapters and n not in self.merged]
        if any(other.transforms_input for other in others if other is not delta):
            return False
        return not others or others[0] is delta

    def merge(self, name: str, safe: bool = True) -> None:
        if name in self.merged or name not in self.adapters:
            return
        delta = self.adapters[name]
        if not delta.mergeable:
            raise MergeError(f"adapter '{name}' ({type(delta).__name__}) cannot be merged into the weights")
        self._edit_weight(lambda: delta.merge_into(self, safe=safe))
        self.merged.append(name)

    def unmerge(self) -> None:
        while self.merged:
            self.unmerge_last()

    def unmerge_last(self) -> None:
        delta = self.adapters[self.merged.pop()]
        self._edit_weight(lambda: delta.unmerge_from(self))

    def _edit_weight(self, edit: Callable[[], None]) -> None:
        """Run a merge/unmerge; a quantized base is dequantized first, edited in place, then re-quantized."""
        if not is_quantized(self.base_layer):
            edit()
            return
        self._dense_weight = strategy("dequantize")(self.base_layer)
        try:
            edit()
            strategy("requantize")(self.base_layer, self._dense_weight)
        finally:
            self._dense_weight = None

    @property
    def weight_for_merge(self) -> torch.Tensor:
        """The base weight merges read and edit in place; for a quantized base, a dense dequantized copy."""
        if self._dense_weight is not None:
            return self._dense_weight
        return base_weight(self.base_layer)

    def extra_repr(self) -> str:
        return f"base={self.base_layer!r}, adapters={list(self.adapters.keys())}"


class TrainableCopies(AdapterHost):
    """``modules_to_save``: ``y = copies[a](x)`` for the active adapter ``a``, else ``base(x)``.

    Each adapter owns a full trainable copy of the module (e.g. a fresh classification head).
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.copies = nn.ModuleDict()

    def adapter_names(self) -> list[str]:
        return list(self.copies.keys())

    def adapter_module(self, name: str) -> nn.Module | None:
        return self.copies[name] if name in self.copies else None

    def add_copy(self, name: str) -> nn.Module:
        """A trainable copy of the base module for adapter ``name``; inside ``protocol.no_init()`` its state-dict
        tensors are left on the meta device for a file to fill (``filling.empty_copy``)."""
        if initialising():
            replica = copy.deepcopy(self.base_layer)
        else:
            first = next(self.base_layer.parameters(), None)
            replica = empty_copy(self.base_layer, first.device if first is not None else None)
        for parameter in replica.parameters():
            parameter.requires_grad_(True)
        self.copies[name] = replica
        return replica

    def remove_adapter(self, name: str) -> None:
        if name in self.copies:
            del self.copies[name]

    def _chosen(self) -> nn.Module:
        if not self.disabled:
            for name in self.active:
                if name in self.copies:
                    return self.copies[name]
        return self.base_layer

    def forward(self, *args, **kwargs):
        if self.row_adapters is not None and not self.disabled:
            return self._forward_mixed(*args, **kwargs)
        return self._chosen()(*args, **kwargs)

    def _forward_mixed(self, x: torch.Tensor, *args, **kwargs):
        rows = row_names(self.row_adapters, x.shape[0])
        outputs: dict[str, torch.Tensor] = {}
        for name in dict.fromkeys(rows):
            module = self.copies[name] if name in self.copies else self.base_layer
            outputs[name] = module(x, *args, **kwargs)
        first = outputs[rows[0]]
        result = first.clone()
        for i, name in enumerate(rows):
            result[i] = outputs[name][i]
        return result

    def unwrap_to(self, names: Iterable[str]) -> nn.Module:
        """The module to leave in the model on unload: the first listed adapter's copy, else the base."""
        for name in names:
            if name in self.copies:
                return self.copies[name]
        return self.unwrap()

    def extra_repr(self) -> str:
        return f"copies={list(self.copies.keys())}"


def row_names(rows: list[str], batch: int) -> list[str]:
    """``adapter_names`` for a batch of ``batch`` rows; ``generate(num_beams=k)`` repeats each row k times."""
    if len(rows) == batch:
        return rows
    if rows and batch % len(rows) == 0:
        k = batch // len(rows)
        return [name for name in rows for _ in range(k)]
    raise ValueError(f"adapter_names has {len(rows)} entries but the batch has {batch} rows")


def layer_kind(module: nn.Module) -> str | None:
    """Which delta shape a module takes: "linear", "conv1d_t" (transformers' Conv1D), "embedding", "conv"."""
    if isinstance(module, DeltaLayer):
        module = module.base_layer
    kind = getattr(type(module), "deltatune_kind", None)  # e.g. deltatune.quant.NF4Linear
    if kind is not None:
        return kind
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "conv1d_t"
    return None


SUPPORTED_TYPES = "Linear, Embedding, Conv1d, Conv2d, Conv3d, transformers Conv1D"


def is_quantized(module: nn.Module) -> bool:
    """Whether a module stores its weight 4-bit quantized (``deltatune.quant.NF4Linear``, bitsandbytes ``Linear4bit``)."""
    if isinstance(module, AdapterHost):
        module = module.base_layer
    if getattr(type(module), "deltatune_quantized", False):
        return True
    return type(module._parameters.get("weight")).__name__ == "Params4bit"


def base_weight(module: nn.Module) -> torch.Tensor:
    """A layer's dense weight: the parameter itself, or a fresh dequantized copy when it is stored 4-bit."""
    if isinstance(module, AdapterHost):
        module = module.base_layer
    if is_quantized(module):
        return strategy("dequantize")(module)
    return module._parameters["weight"]


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a "linear" or "conv1d_t" layer, also when its weight is stored packed."""
    if isinstance(module, AdapterHost):
        module = module.base_layer
    if layer_kind(module) == "conv1d_t":
        return tuple(module.weight.shape)  # Conv1D stores [in, out]
    return module.in_features, module.out_features


# base model -> the DeltaModel that wraps it; weak both ways, so neither is kept alive, and copies of a wrapped
# base (copy.deepcopy) are not claimed
_WRAPPERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def claim(model: nn.Module, wrapper: nn.Module) -> None:
    """Record that ``wrapper`` (a DeltaModel) owns ``model``, so a second ``wrap`` of it can be refused."""
    _WRAPPERS[model] = weakref.ref(wrapper)


def wrapper_of(model: nn.Module) -> nn.Module | None:
    """The live DeltaModel that wraps ``model`` (``None`` when there is none)."""
    ref = _WRAPPERS.get(model)
    wrapper = ref() if ref is not None else None
    return wrapper if wrapper is not None and wrapper._modules.get("model") is model else None
