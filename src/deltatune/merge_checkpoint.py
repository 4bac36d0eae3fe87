"""Merge an adapter into a checkpoint without a model: state dict in, merged state dict out.

Every layer the adapter targets gets the method's own merge (``merge_into`` of the delta protocol): ``W' = W0 + dW``
for the LoRA family, ``W0 * l`` and ``b * l`` for IA3, and so on. Each delta is built from the adapter's config for a
stand-in layer holding a copy of the checkpoint's weight (and bias), filled with the file's tensors and merged into
it. This is what ``merge_and_unload`` computes, for every per-layer mergeable method, without instantiating the base
model (handy for a 7B checkpoint on a small machine, one shard at a time).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .config import DeltaConfig
from .errors import AdapterFileError, MergeError
from .filling import fill, place, unfilled
from .io import CONFIG_NAME, read_config, read_tensors
from .layers import DeltaLayer
from .protocol import no_init


def merge_checkpoint(
    state_dict: Mapping[str, torch.Tensor], adapter: str | os.PathLike, fan_in_fan_out: bool | None = None,
) -> dict[str, torch.Tensor]:
    """A new state dict with the adapter folder ``adapter`` merged in; ``state_dict`` is left untouched.

    Keys are the base model's own (``model.layers.0.self_attn.q_proj.weight``). ``fan_in_fan_out``: whether 2-d
    weights are stored [in, out] (transformers' ``Conv1D``, GPT-2); default: the adapter config's value.
    """
    directory = Path(adapter)
    config = read_config(directory)
    if not config.per_layer or not config.mergeable:
        raise MergeError(
            f"{type(config).__name__} is not a weight update ({config.unmergeable_reason}); "
            f"keep it as a live adapter"
        )
    if getattr(config, "bias", "none") != "none":
        raise MergeError("the adapter trains base biases (bias != 'none'); merge it with load(...).merge_and_unload()")
    tensors = read_tensors(directory, prefix=config.file_prefix)
    shared = sorted(set(tensors) & set(config.file_root_keys))
    if shared:
        raise MergeError(
            f"the adapter has adapter-level tensors shared by all its layers ({', '.join(shared)}); merging one layer "
            f"at a time cannot build them: use dt.load(base, adapter).merge_and_unload()"
        )
    if fan_in_fan_out is None:  # the config detects it per layer type; the file records it for PEFT
        raw = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
        fan_in_fan_out = bool(raw.get("fan_in_fan_out", False))
    transposed = fan_in_fan_out
    merged = dict(state_dict)
    for path, layer_tensors in _by_layer(state_dict, tensors, directory).items():
        bias = state_dict.get(f"{path}.bias")
        delta, host = _filled_delta(config, path, state_dict[f"{path}.weight"], bias, layer_tensors, transposed, directory)
        with torch.no_grad():
            delta.merge_into(host, safe=True)
        merged[f"{path}.weight"] = host.base_layer.weight.detach()
        if bias is not None:
            merged[f"{path}.bias"] = host.base_layer.bias.detach()
    return merged


def _by_layer(
    state_dict: Mapping[str, torch.Tensor], tensors: dict[str, torch.Tensor], directory: Path
) -> dict[str, dict[str, torch.Tensor]]:
    """Adapter tensors grouped by the checkpoint layer they belong to (the longest path with a ``.weight``)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            path = ".".join(parts[:cut])
            if f"{path}.weight" in state_dict:
                groups.setdefault(path, {})[".".join(parts[cut:])] = tensor
                break
        else:
            raise AdapterFileError(f"{directory}: tensor {key!r} belongs to no layer of the checkpoint; is it the right base?")
    return groups


def _stand_ins(weight: torch.Tensor, transposed: bool) -> list[nn.Module]:
    """Layers holding ``weight`` itself, in the order to try (a 2-d weight may be a Linear or an Embedding)."""
    if weight.ndim == 2:
        out_features, in_features = weight.shape[::-1] if transposed else weight.shape
        linear = _conv1d(in_features, out_features) if transposed else nn.Linear(in_features, out_features, bias=False, device="meta")
        return [linear, nn.Embedding(*weight.shape, device="meta")]
    if weight.ndim in (3, 4, 5):
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[weight.ndim]
        return [conv(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=False, device="meta")]
    raise MergeError(f"a {weight.ndim}-d weight is not a layer an adapter targets")


def _conv1d(in_features: int, out_features: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):  # the weight is replaced by the checkpoint's own
        layer = Conv1D(out_features, in_features)
    layer.bias = None
    return layer


def _filled_delta(
    config: DeltaConfig, path: str, weight: torch.Tensor, bias: torch.Tensor | None, tensors: dict[str, torch.Tensor],
    transposed: bool, directory: Path,
) -> tuple[nn.Module, DeltaLayer]:
    """The delta of ``path`` built for the first stand-in (holding copies of ``weight`` and ``bias``) whose tensor
    names and shapes the file fills exactly."""
    for module in _stand_ins(weight, transposed):
        module.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if bias is not None and not isinstance(module, nn.Embedding):
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        try:
            with no_init():  # built empty: the file's tensors are the delta's, no initialisation runs first
                delta = config.create_delta(module, path)
        except NotImplementedError:
            raise MergeError(
                f"{config.method} builds its deltas for all layers together; merging one layer at a time cannot: "
                f"use dt.load(base, adapter).merge_and_unload()"
            ) from None
        own = delta.state_dict(keep_vars=True)
        if own.keys() == tensors.keys() and all(own[k].shape == tensors[k].shape for k in own):
            fill([place(delta, weight.device, torch.float32)], {id(t): tensors[k] for k, t in own.items()})
            left = unfilled([(path, delta)])
            if left:
                raise MergeError(f"{config.method} left {', '.join(left[:3])} unfilled on the meta device")
            return delta, DeltaLayer(module)
    raise AdapterFileError(
        f"{directory}: the tensors of '{path}' ({sorted(tensors)}) do not fit a {config.method} delta for a weight of "
        f"shape {tuple(weight.shape)}; is it the right base?"
    )
