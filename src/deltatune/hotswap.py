"""Hot-swap: put another LoRA adapter's weights into a live adapter in place, so a ``torch.compile``'d model keeps
its compiled graphs (it guards on tensor shapes and on Python attributes such as the scaling, not on values).

* ``prepare_for_hotswap(model, max_rank)``: pad each LoRA adapter to rank ``max_rank`` with zero rows of A and
  zero columns of B (``s B A`` is unchanged) and fold its scaling into B (``B <- s B``, scaling 1), so adapters
  of any rank <= max_rank and any alpha / rsLoRA rule fit the same shapes and constants. The adapter's config is
  rewritten to match (r = alpha = max_rank, no patterns), so saving it still writes the same delta.
* ``hotswap(model, name, config, tensors)``: for every layer, ``A <- [A_new; 0]``, ``B <- [s_new / s B_new, 0]``
  with ``s`` the live scaling; layers the new adapter does not target get zeros. Only ``copy_`` into existing
  tensors: no new parameter, no changed attribute, hence no recompilation. Everything is checked before anything
  is written; a refused swap changes nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import DeltaConfig, check_positive_int
from .dtypes import work_dtype
from .errors import AdapterFileError, ConfigError
from .layers import DeltaLayer, TrainableCopies
from .methods import config_from_peft_dict
from .protocol import register_strategy

if TYPE_CHECKING:
    from .model import DeltaModel

PREFIX = "base_model.model."
A_KEYS = {"lora_A.weight": "A", "lora_embedding_A": "A", "lora_B.weight": "B", "lora_embedding_B": "B"}


def _lora_deltas(model: DeltaModel, name: str) -> dict[str, nn.Module]:
    """path -> the LoRA delta of adapter ``name`` there; refuses adapters whose deltas are not ``s B A``."""
    if name not in model.configs:
        raise ConfigError(f"no adapter named '{name}'; adapters: {', '.join(model.configs) or 'none'}")
    if name in model.merged_adapters:
        raise ConfigError(f"adapter '{name}' is merged into the weights; call model.unmerge() first")
    deltas = {p: h.adapters[name] for p, h in model.hosts() if isinstance(h, DeltaLayer) and name in h.adapters}
    odd = [f"{p} ({type(d).__name__})" for p, d in deltas.items() if d.low_rank_factors() is None]
    if odd:
        raise ConfigError(f"hot-swap works on LoRA-style adapters (dW = s B A); adapter '{name}' has {odd[:2]}")
    return deltas


def _pad(delta: nn.Module, key: str, dim: int, rank: int, scale: float) -> None:
    """Replace parameter ``key`` of ``delta`` by a copy zero-padded to ``rank`` along ``dim`` and scaled."""
    owner_path, _, leaf = key.rpartition(".")
    owner = delta.get_submodule(owner_path) if owner_path else delta
    old = owner._parameters[leaf]
    shape = list(old.shape)
    shape[dim] = rank
    new = torch.zeros(shape, dtype=old.dtype, device=old.device)
    new.narrow(dim, 0, old.shape[dim]).copy_(old.detach() * scale)
    parameter = nn.Parameter(new, requires_grad=old.requires_grad)
    if getattr(old, "_deltatune_frozen", False):
        parameter._deltatune_frozen = True  # type: ignore[attr-defined]
    owner._parameters[leaf] = parameter
    for attribute in ("out_features", "out_channels") if dim == 0 else ("in_features", "in_channels"):
        if hasattr(owner, attribute) and owner is not delta:
            setattr(owner, attribute, rank)


@torch.no_grad()
def prepare_for_hotswap(model: DeltaModel, max_rank: int, names: list[str] | None = None) -> None:
    """Pad adapters ``names`` (default: every LoRA-style adapter) to rank ``max_rank``, scaling folded into B.

    Call it before ``torch.compile``: it changes parameter shapes, which a compiled graph would recompile for.
    """
    check_positive_int("max_rank", max_rank)
    if names is None:  # every adapter whose deltas are all s B A (LoRA, rsLoRA, AsyLoRA; not DoRA, MoRA, prompts)
        deltas = [(n, d) for _, h in model.hosts() if isinstance(h, DeltaLayer) for n, d in h.adapters.items()]
        names = [n for n in model.configs if any(a == n for a, _ in deltas) and hasattr(model.configs[n], "rank_pattern")
                 and all(d.low_rank_factors() is not None for a, d in deltas if a == n)]
    plans = {name: _lora_deltas(model, name) for name in names}
    for name, deltas in plans.items():
        too_big = {p: int(d.low_rank_factors()[1].shape[0]) for p, d in deltas.items()}
        too_big = {p: r for p, r in too_big.items() if r > max_rank}
        if too_big:
            raise ConfigError(f"adapter '{name}' has rank {max(too_big.values())} at {next(iter(too_big))}, above "
                              f"max_rank={max_rank}; pass a max_rank at least that large")
    for name, deltas in plans.items():
        for delta in deltas.values():
            for key in dict(delta.named_parameters()):
                if key in A_KEYS:
                    is_a = A_KEYS[key] == "A"
                    _pad(delta, key, 0 if is_a else 1, max_rank, 1.0 if is_a else float(delta.scaling))
            delta.scaling = 1.0
        model.configs[name] = model.configs[name].replace(
            r=max_rank, alpha=max_rank, rslora=False, rank_pattern={}, alpha_pattern={}
        )


def read_adapter(directory: str | os.PathLike) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
    """The config and tensors (keys without ``base_model.model.``) of an adapter folder; safetensors only."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterFileError(f"{directory} lacks adapter_config.json or adapter_model.safetensors; "
                               f"point at a folder written by model.save() or PEFT")
    try:
        config = config_from_peft_dict(json.loads(config_path.read_text(encoding="utf-8")))
        tensors = load_file(str(weights_path))
    except (ValueError, OSError) as error:
        raise AdapterFileError(f"{directory} could not be read ({error}); save the adapter again") from error
    return config, tensors


def _plan(
    model: DeltaModel, name: str, config: DeltaConfig, tensors: dict[str, torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(live tensor, value to copy into it) pairs for the whole swap, after checking every shape."""
    if not hasattr(config, "scaling") or not getattr(config, "mergeable", False):
        raise ConfigError(f"hot-swap takes a LoRA-style adapter (dW = s B A), got {type(config).__name__}")
    deltas = _lora_deltas(model, name)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    copies = {p: h.copies[name] for p, h in model.hosts() if isinstance(h, TrainableCopies) and name in h.copies}
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, value in tensors.items():
        key = key[len(PREFIX):] if key.startswith(PREFIX) else key
        path, part = next(((key[: -len(s) - 1], s) for s in A_KEYS if key.endswith("." + s)), (None, None))
        if path is not None:
            if path not in deltas:
                raise ConfigError(f"the new adapter adapts '{path}', which adapter '{name}' does not; a swap cannot add "
                                  f"layers (that would recompile): add the layer to '{name}' before compiling")
            groups.setdefault(path, {})[A_KEYS[part]] = value
            continue
        owner = next((p for p in copies if key.startswith(p + ".")), None)
        live = copies[owner].state_dict(keep_vars=True).get(key[len(owner) + 1:]) if owner else None
        if live is None or live.shape != value.shape:
            raise ConfigError(f"tensor {key!r} of the new adapter has no place of that shape in adapter '{name}'")
        pairs.append((live, value))
    for path, delta in deltas.items():
        live_b, live_a = delta.low_rank_factors()
        new = groups.get(path, {})
        a, b = new.get("A"), new.get("B")
        a = torch.zeros(0, live_a.shape[1]) if a is None else a.flatten(1)
        b = torch.zeros(live_b.shape[0], 0) if b is None else b.flatten(1)
        if a.shape[0] > live_a.shape[0] or a.shape[1] != live_a.shape[1] or b.shape != (live_b.shape[0], a.shape[0]):
            raise ConfigError(f"layer '{path}': the new factors A{tuple(a.shape)}, B{tuple(b.shape)} do not fit A"
                              f"{tuple(live_a.shape)}, B{tuple(live_b.shape)}; call prepare_for_hotswap(max_rank=...) "
                              f"with max_rank >= every rank you will swap in, before compiling")
        scale = config.scaling(path) / float(delta.scaling)
        pairs.append((live_a, _padded(a, live_a.shape, 0, 1.0)))
        pairs.append((live_b, _padded(b, live_b.shape, 1, scale)))
    return pairs


def _padded(value: torch.Tensor, shape: Any, dim: int, scale: float) -> torch.Tensor:
    out = torch.zeros(tuple(shape), dtype=work_dtype(value.dtype))
    out.narrow(dim, 0, value.shape[dim]).copy_(value.to(out.dtype) * scale)
    return out


@torch.no_grad()
def hotswap(model: DeltaModel, name: str, config: DeltaConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the LoRA adapter (``config``, PEFT-layout ``tensors``) into adapter ``name`` in place (see above)."""
    for live, value in _plan(model, name, config, tensors):
        live.copy_(value.to(live.device))


def hotswap_adapter(
    model: DeltaModel, source: str | os.PathLike | dict[str, torch.Tensor], name: str, config: DeltaConfig | None = None
) -> None:
    """``DeltaModel.hotswap_adapter``: ``source`` is an adapter folder, or a PEFT-layout state dict with its config."""
    tensors: Any
    if isinstance(source, dict):
        if config is None:
            raise ConfigError("hotswap_adapter(state_dict, ...) needs config= (its alpha and r give the scaling)")
        tensors = source
    else:
        config, tensors = read_adapter(source)
    hotswap(model, name, config, tensors)


register_strategy("prepare_for_hotswap", prepare_for_hotswap)
register_strategy("hotswap_adapter", hotswap_adapter)
