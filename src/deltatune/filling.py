"""Adapters whose tensors a caller fills: ``DeltaModel.add_adapter(name, config, init=False)`` builds them inside
``protocol.no_init()``, ``fill`` gives the tensors their values, ``unfilled`` lists what is left.

Why the meta device and not allocate-then-copy: a meta tensor has its shape and dtype and no storage, so building
costs no memory and no initialiser runs on real data, and ``fill`` can hand a file tensor of the right device and
dtype to the adapter as it is (no second copy, no fill with zeros first). A tensor that nothing filled stays
detectable (``is_meta``), whereas uninitialised real memory (``torch.empty`` / ``Module.to_empty``) would silently
compute with garbage; non-persistent buffers computed at build time are real, so they are never mistaken for
file tensors. The device a meta tensor is meant for is noted on its adapter module by ``place`` (the builder knows
it: the base layer's device), since a meta tensor cannot carry it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

DEVICE_ATTR = "_deltatune_fill_device"


def place(module: nn.Module, device: torch.device | str | None, dtype: torch.dtype | None) -> nn.Module:
    """``module.to(device, dtype)`` for its real tensors (floating ones take ``dtype``, as ``Module.to`` does); its meta
    tensors take only the dtype, and ``device`` is noted on ``module`` for ``fill``."""

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        target = dtype if dtype is not None and tensor.is_floating_point() else None
        if tensor.is_meta:
            return tensor.to(dtype=target) if target is not None else tensor
        return tensor.to(device=device, dtype=target)

    module._apply(convert)
    if device is not None:
        module.__dict__[DEVICE_ATTR] = torch.device(device)
    return module


def empty_copy(module: nn.Module, device: torch.device | None) -> nn.Module:
    """A deep copy of ``module`` whose parameters and persistent buffers (what its state dict, and so a file, holds)
    are meta tensors of the same shapes and dtypes; non-persistent buffers, which no file holds, are copied. A module
    with parameters of another type than ``nn.Parameter`` (a quantized one) is copied whole."""
    memo: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for parameter in sub._parameters.values():
            if parameter is None:
                continue
            if type(parameter) is not nn.Parameter:
                return copy.deepcopy(module)
            memo[id(parameter)] = nn.Parameter(torch.empty_like(parameter, device="meta"), parameter.requires_grad)
        for name, buffer in sub._buffers.items():
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    replica = copy.deepcopy(module, memo)
    if device is not None:
        replica.__dict__[DEVICE_ATTR] = device
    return replica


def fill(modules: Iterable[nn.Module], values: Mapping[int, torch.Tensor]) -> None:
    """Give each meta parameter or buffer of ``modules`` (at any depth) whose ``id`` is a key of ``values`` that value,
    on the device ``place`` noted for its module (else the default device) in the meta tensor's dtype.

    The tensor objects stay the same (``torch.utils.swap_tensors``), so their ``requires_grad``, their attributes and
    every reference to them (a child module several deltas share) see the value. A value already on that device and
    of that dtype becomes the tensor as it is, without a copy: the caller must not use it afterwards. A value that is
    a view into a larger storage, or shares its storage with a value used before, is copied, so that no two adapter
    tensors share memory.
    """
    used: set[int] = set()
    for module in modules:
        device = module.__dict__.get(DEVICE_ATTR) or torch.get_default_device()
        for sub in module.modules():
            for slots in (sub._parameters, sub._buffers):
                for name, tensor in slots.items():
                    if tensor is not None and tensor.is_meta and id(tensor) in values:
                        _swap_in(tensor, values[id(tensor)], device, used, name)


def _swap_in(tensor: torch.Tensor, value: torch.Tensor, device: torch.device, used: set[int], name: str) -> None:
    """Make the meta ``tensor`` hold ``value`` (on ``device``, in ``tensor``'s dtype), keeping the object."""
    if tuple(value.shape) != tuple(tensor.shape):
        raise ValueError(f"{name}: value of shape {tuple(value.shape)} for a tensor of shape {tuple(tensor.shape)}")
    value = _own(value.detach().to(device=device, dtype=tensor.dtype), used)
    if isinstance(tensor, nn.Parameter):
        value = nn.Parameter(value, requires_grad=tensor.requires_grad)
        value.__dict__.update(tensor.__dict__)  # swap_tensors swaps the attribute dicts too: keep the tensor's own
    torch.utils.swap_tensors(tensor, value)


def _own(value: torch.Tensor, used: set[int]) -> torch.Tensor:
    """``value``, or a contiguous copy of it when it is a view of a larger storage or its storage is in ``used``."""
    storage = value.untyped_storage()
    whole = value.is_contiguous() and value.storage_offset() == 0 and storage.nbytes() == value.nbytes
    if not whole or storage.data_ptr() in used:
        value = value.clone(memory_format=torch.contiguous_format)
        storage = value.untyped_storage()
    if storage.nbytes():
        used.add(storage.data_ptr())
    return value


def unfilled(modules: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """``path.name`` of every parameter and buffer (non-persistent ones included) of the given ``(path, module)``
    pairs that is still on the meta device."""
    left: list[str] = []
    for path, module in modules:
        named = [*module.named_parameters(), *module.named_buffers()]
        left += [f"{path}.{name}" if path else name for name, tensor in named if tensor.is_meta]
    return left
