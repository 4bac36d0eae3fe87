"""Prompt/prefix adapters in mixed-adapter batches (``adapter_names=``): per-row virtual tokens where that is exact.

Row ``i`` carries ``p_i`` key/value prefix positions (prefix tuning, P-tuning v2) and ``v_i`` input virtual tokens
(prompt tuning, P-tuning); both are 0 for rows of layer adapters and ``"__base__"`` rows. With ``P = max p_i`` and
``V = max v_i``:

* cache (prefill): ``P`` prefix slots in every layer; row i's prefix fills the last ``p_i`` of them, the others hold
  zeros and are masked;
* input (prefill): ``inputs_embeds_i = [0 (V - v_i); E_i (v_i); embed(ids_i)]``, the leading zeros masked;
* 2-D attention mask, every call: ``[m_prefix_i (P); m_virtual_i (V); attention_mask_i]``;
* ``position_ids``: real token ``t`` of row i at ``p_i + v_i + t`` and its j-th virtual token at ``p_i + j``,
  exactly the positions the row has when run alone; ``cache_position`` (cache slots) moves by ``P + V`` for all.

A masked key gets exactly zero attention weight, so every real token attends to exactly the keys and values it sees
when its row runs alone, at the same positions. Exact (<= 1e-5, tests/test_mixed_batch.py) when

1. the model takes ``position_ids`` and its positions enter only through them (RoPE, learned absolute positions:
   Llama, GPT-2, BERT); needed only when rows have different offsets ``p_i + v_i``;
2. rows with fewer input virtual tokens than others (``v_i < V``) exist only in causal LMs: a row's real-token
   outputs are its last ``seq`` positions, and generation reads the last one. An encoder's head reads a fixed
   position (BERT's pooler reads position 0, which would be a padding slot), so there every row must carry the
   same number of input virtual tokens.

Elsewhere a ``ConfigError`` names the reason and the fix (run those rows in their own batch with ``set_adapter``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..kvcache import pop_cache, put_cache
from ..layers import row_names
from ..methods.virtual_tokens import input_embeddings

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def row_counts(rows: list[str], adapters: nn.ModuleDict) -> tuple[list[int], list[int]]:
    """``(p_i, v_i)`` per row: its prefix length and its number of input virtual tokens."""
    prefix, virtual = [], []
    for name in rows:
        module = adapters[name] if name in adapters else None
        kind = getattr(module, "kind", None)
        prefix.append(module.num_virtual_tokens if kind == "prefix" else 0)
        virtual.append(module.num_virtual_tokens if kind == "prompt" else 0)
    return prefix, virtual


def check_exact(root: nn.Module, signature: inspect.Signature, rows: list[str], prefix: list[int], virtual: list[int]) -> None:
    """Refuse the batches where per-row virtual tokens would not equal running each row alone (see module doc)."""
    big_p, big_v = max(prefix), max(virtual)
    model = type(root).__name__
    counts = {name: p + v for name, p, v in zip(rows, prefix, virtual)}
    if any(v != big_v for v in virtual) and not model.endswith(CAUSAL_SUFFIXES):
        raise ConfigError(
            f"adapter_names mixes rows with different numbers of input virtual tokens ({counts}) on {model}: padding "
            f"them is exact only in causal LMs, where outputs are read at the end; this model's head reads a fixed "
            f"position. Group the batch: run rows of prompt-tuning adapters with equal num_virtual_tokens together "
            f"(or each adapter alone with set_adapter)"
        )
    if any(p + v != big_p + big_v for p, v in zip(prefix, virtual)) and "position_ids" not in signature.parameters:
        raise ConfigError(
            f"adapter_names mixes rows with different numbers of virtual tokens ({counts}), which needs per-row "
            f"position_ids, but {model}.forward takes none. Group the batch: run each prompt/prefix adapter's rows "
            f"alone with set_adapter"
        )


def lead_mask(prefix: list[int], virtual: list[int], device: torch.device) -> torch.Tensor:
    """[batch, P + V] ones where a row has a prefix slot or input virtual token, zeros on its padding."""
    big_p, big_v = max(prefix), max(virtual)
    slots = torch.arange(big_p + big_v, device=device)
    p = torch.tensor(prefix, device=device)[:, None]
    v = torch.tensor(virtual, device=device)[:, None]
    in_prefix = (slots < big_p) & (slots >= big_p - p)
    in_virtual = slots >= big_p + big_v - v
    return (in_prefix | in_virtual).long()


def per_row(tensors: dict[str, torch.Tensor], rows: list[str], like: torch.Tensor) -> torch.Tensor:
    """``stack([tensors[row] or zeros])`` over the rows (differentiable)."""
    zero = torch.zeros_like(like)
    return torch.stack([tensors.get(name, zero) for name in rows])


def write_mixed_prefix(
    cache: Any, adapters: nn.ModuleDict, rows: list[str], prefix: list[int], device: torch.device, dtype: torch.dtype,
) -> None:
    """Each row's prefix keys/values (left-padded with zeros to ``P``) appended to the cache, layer by layer."""
    big_p = max(prefix)
    names = [name for name in dict.fromkeys(rows) if name in adapters and adapters[name].kind == "prefix"]
    per_module = {name: adapters[name].key_values() for name in names}
    num_layers = len(per_module[names[0]])
    first = per_module[names[0]][0][0]
    for name, kv in per_module.items():
        if len(kv) != num_layers or kv[0][0].shape[0] != first.shape[0] or kv[0][0].shape[2] != first.shape[2]:
            raise ConfigError(f"prefix adapter '{name}' has another layer count or head shape than '{names[0]}'")
    positions = torch.arange(big_p, device=device)
    for layer in range(num_layers):
        keys, values = {}, {}
        for name, kv in per_module.items():
            pad = (0, 0, big_p - kv[layer][0].shape[1], 0)  # [heads, p, head_dim] -> [heads, P, head_dim]
            keys[name] = F.pad(kv[layer][0], pad).to(device=device, dtype=dtype)
            values[name] = F.pad(kv[layer][1], pad).to(device=device, dtype=dtype)
        like = keys[names[0]]
        cache.update(per_row(keys, rows, like), per_row(values, rows, like), layer, {"cache_position": positions})


def mixed_virtual_tokens(
    root: nn.Module, signature: inspect.Signature, kwargs: dict[str, Any], row_adapters: list[str], adapters: nn.ModuleDict,
) -> dict[str, Any]:
    """Rewrite one forward call's keyword arguments for a mixed batch holding prompt/prefix rows (see module doc)."""
    from transformers.cache_utils import Cache, DynamicCache


    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    ref = embeds if embeds is not None else ids
    if ref is None:
        raise ConfigError("prompt/prefix adapters need input_ids or inputs_embeds")
    batch, seq, device = ref.shape[0], ref.shape[1], ref.device
    rows = row_names(row_adapters, batch)
    prefix, virtual = row_counts(rows, adapters)
    check_exact(root, signature, rows, prefix, virtual)
    big_p, big_v = max(prefix), max(virtual)
    out = dict(kwargs)
    cache = pop_cache(out)
    if cache is not None and not isinstance(cache, Cache):
        raise ConfigError("the KV cache must be a transformers Cache (e.g. DynamicCache), not a legacy tuple")
    past = cache.get_seq_length() if cache is not None else 0
    prefill = past == 0
    lead = lead_mask(prefix, virtual, device)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ConfigError("prompt/prefix adapters need a 2-D attention_mask [batch, seq] (or none)")
        out["attention_mask"] = torch.cat([lead.to(mask.dtype), mask], dim=1)
    elif not bool(lead.all()):
        seen = 0 if prefill else past - big_p - big_v  # real tokens already in the cache
        out["attention_mask"] = torch.cat([lead, lead.new_ones(batch, seen + seq)], dim=1)
    if prefill and big_p:
        cache = cache if cache is not None else DynamicCache(config=getattr(root, "config", None))
        write_mixed_prefix(cache, adapters, rows, prefix, device, input_embeddings(root).weight.dtype)
    put_cache(out, root, cache)
    if prefill and big_v:
        if embeds is None:
            embeds = root.get_input_embeddings()(ids)
        tokens = {}
        for name in dict.fromkeys(rows):
            if name in adapters and adapters[name].kind == "prompt":
                e = adapters[name]().to(device=device, dtype=embeds.dtype)
                tokens[name] = F.pad(e, (0, 0, big_v - e.shape[0], 0))
        out["inputs_embeds"] = torch.cat([per_row(tokens, rows, next(iter(tokens.values()))), embeds], dim=1)
        out["input_ids"] = None
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels.shape[1] == seq:
            out["labels"] = torch.cat([labels.new_full((labels.shape[0], big_v), -100), labels], dim=1)
        if kwargs.get("token_type_ids") is not None:
            types = kwargs["token_type_ids"]
            out["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], big_v), types], dim=1)
    out.update(shifted_positions(kwargs, signature, prefix, virtual, prefill, past, seq, batch, device))
    return out


def shifted_positions(
    kwargs: dict[str, Any], signature: inspect.Signature, prefix: list[int], virtual: list[int], prefill: bool,
    past: int, seq: int, batch: int, device: torch.device,
) -> dict[str, torch.Tensor]:
    """``position_ids`` per row (made from the cache length when not given) and ``cache_position`` (see module doc)."""
    big_p, big_v = max(prefix), max(virtual)
    out = {}
    positions = kwargs.get("position_ids")
    if positions is None and "position_ids" in signature.parameters:
        start = 0 if prefill else past - big_p - big_v
        positions = torch.arange(start, start + seq, device=device)[None]
    if positions is not None:
        if positions.dim() != 2:
            raise ConfigError("mixed batches with prompt/prefix rows need 2-D position_ids [batch, seq]")
        p = torch.tensor(prefix, device=device, dtype=positions.dtype)[:, None]
        v = torch.tensor(virtual, device=device, dtype=positions.dtype)[:, None]
        shifted = positions.expand(batch, -1) + p + v
        if prefill and big_v:  # the j-th virtual token of row i at p_i + j; padding slots at 0 (masked)
            slots = torch.arange(big_v, device=device, dtype=positions.dtype)[None]
            shifted = torch.cat([(p + slots - (big_v - v)).clamp(min=0), shifted], dim=1)
        out["position_ids"] = shifted
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:
        shifted_slots = cache_position + big_p + big_v
        if prefill and big_v:
            lead = torch.arange(big_p, big_p + big_v, device=cache_position.device, dtype=cache_position.dtype)
            shifted_slots = torch.cat([lead, shifted_slots], dim=-1)
        out["cache_position"] = shifted_slots
    return out
