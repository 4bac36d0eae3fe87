"""What an autograd graph keeps for backward, read from the graph itself (for memory reports and tests)."""

from __future__ import annotations

import torch


def _saved_of(node) -> list[torch.Tensor]:
    found: list = []
    names = ["saved_tensors"] + [name for name in dir(node) if name.startswith("_saved_")]
    for name in names:
        try:
            value = getattr(node, name)
        except (AttributeError, RuntimeError):  # not a custom Function, or already freed by a backward
            continue
        found += list(value) if isinstance(value, (tuple, list)) else [value]
    return [t for t in found if isinstance(t, torch.Tensor)]


def saved_tensor_bytes(output: torch.Tensor) -> int:
    """Bytes of the distinct storages that the graph behind ``output`` keeps for its backward.

    Unlike counting through ``saved_tensors_hooks``, this does not change what the ops save (deltatune's fused
    LoRA op rebuilds some inputs instead of saving them, and does not under hooks). Call it after the forward,
    before ``backward``.
    """
    storages: dict[int, int] = {}
    seen: set = set()
    todo = [output.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for tensor in _saved_of(node):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        todo += [next_node for next_node, _ in node.next_functions]
    return sum(storages.values())
