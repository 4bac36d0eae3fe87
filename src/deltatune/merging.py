"""Merging adapters into the base weights, all or nothing (``DeltaModel.merge``)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .errors import ConfigError, MergeError
from .layers import DeltaLayer


def merge_adapters(model: Any, names: list[str], safe: bool, skip_unmergeable: bool) -> list[str]:
    """Merge ``names`` (with ``skip_unmergeable``: their mergeable part) into every host's base weight; a refused
    merge changes nothing. Returns the names left unmerged."""
    blocked = unmergeable(model, names, skip_unmergeable)
    names = [n for n in names if n not in blocked]
    check_untied(model, names)
    work = [
        (path, host, name)
        for path, host in model.hosts()
        if isinstance(host, DeltaLayer)
        for name in merge_order(host, [n for n in names if n in host.adapters and n not in host.merged])
    ]
    if safe:  # check every layer before writing any
        for path, host, name in work:
            if not torch.isfinite(host.adapters[name].merged_weight(host)).all():
                raise MergeError(f"merging adapter '{name}' would put NaN/inf into '{path}'; nothing was changed")
    done: list[DeltaLayer] = []
    try:
        for _, host, name in work:
            host.merge(name, safe=safe)
            done.append(host)
    except BaseException:
        for host in reversed(done):
            host.unmerge_last()
        raise
    return blocked


def merge_order(host: DeltaLayer, names: list[str]) -> list[str]:
    """The order to merge ``names`` (given in active order, as ``merge()`` passes them) so that the merged weight
    reproduces the forward ``y = W0 T_k..T_1 x + dW x`` (see ``deltatune.protocol``): input transforms in reverse
    order first (``W0 -> W0 T_k -> W0 T_k T_(k-1) ...``), then the other deltas in the given order (DoRA reads the
    weight it is merged into: a caller may merge it first on purpose). Unmerging pops them in reverse."""
    inputs = [n for n in names if host.adapters[n].transforms_input]
    return inputs[::-1] + [n for n in names if n not in inputs]


def unmergeable(model: Any, names: list[str], skip_unmergeable: bool) -> list[str]:
    """The adapters in ``names`` that are not weight updates: a ``MergeError`` naming them and why, or (with
    ``skip_unmergeable``) a warning and the list."""
    for name in names:
        if name not in model.configs:
            raise ConfigError(f"no adapter named '{name}'; adapters: {', '.join(model.configs)}")
    blocked = [n for n in names if not model.configs[n].mergeable]
    if not blocked:
        return []
    mergeable = [n for n in names if n not in blocked]
    if not skip_unmergeable:
        reasons = "; ".join(
            f"'{n}' ({type(model.configs[n]).__name__}: {model.configs[n].unmergeable_reason})" for n in blocked
        )
        hint = (
            f"pass skip_unmergeable=True to merge only {mergeable} and keep {blocked} as live adapters"
            if mergeable else "keep it as a live adapter (it works unmerged), or unload() to drop it"
        )
        raise MergeError(f"cannot merge into the weights: {reasons}; {hint}")
    warnings.warn(
        f"merged {mergeable}; adapters {blocked} cannot be merged and stay active as unmerged adapters", stacklevel=4
    )
    return blocked


def check_untied(model: Any, names: list[str]) -> None:
    """Refuse to merge into a weight shared with another module (tied embeddings / lm_head)."""
    owners: dict[int, list[str]] = {}
    for path, parameter in model.model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), []).append(path)
    for path, host in model.hosts():
        if isinstance(host, DeltaLayer) and any(n in host.adapters for n in names):
            weight = host._parameters.get("weight")
            shared = [p for p in owners.get(id(weight), []) if p != f"{path}.weight"] if weight is not None else []
            if shared:
                raise MergeError(
                    f"the weight of '{path}' is tied to {shared}; merging would change both. Untie the "
                    f"weights first (e.g. clone lm_head.weight) or do not target tied layers"
                )
