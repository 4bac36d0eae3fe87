"""Shared machinery of the prompt family (prompt tuning, P-tuning, prefix tuning, P-tuning v2).

These methods do not change any layer; they add *virtual tokens* at model level. Their parameters live in one
``VirtualTokenHost`` registered as a child of the root model (so the usual adapter bookkeeping of ``DeltaModel``
applies: activation, trainability, deletion, saving). The host installs a forward pre-hook on the root model that
rewrites the call's keyword arguments for the active adapters, which also covers every step of ``generate()``:

* prompt kind (``kind = "prompt"``): ``inputs_embeds = [prompt; embed(input_ids)]`` on the first (prefill) call;
* prefix kind (``kind = "prefix"``): per-layer key/value prefixes written into the (empty) KV cache on prefill.

The cache arrives as ``cache=`` (transformers >= 5.25) or ``past_key_values=`` and leaves under the name the model
takes (``kvcache.py``): a decode step is told from a prefill by the cache's length, whichever name it came under.

With ``V`` virtual tokens in all, on every call the 2-D ``attention_mask`` gets ``V`` leading ones, ``position_ids``
(and ``cache_position`` when given) are shifted by ``V``, and on prefill ``labels`` get ``-100`` and
``token_type_ids`` get ``0`` for the prompt-kind positions (only per-token labels [batch, seq]; sequence labels are
left alone). The caller's tensors never include the virtual tokens.
In a mixed-adapter batch (``adapter_names=``) each row gets its own adapter's virtual tokens, padded and masked
where that is exact; ``batching/virtual.py`` does that rewrite and refuses the batches where it would not be exact.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..config import DeltaConfig
from ..dtypes import adapter_dtype
from ..errors import ConfigError, TargetError
from ..filling import place
from ..kvcache import pop_cache, put_cache
from ..layers import AdapterHost, TrainableCopies
from ..protocol import initialising, strategy
from ..targets import resolve_modules_to_save

if TYPE_CHECKING:
    from ..model import DeltaModel

HOST_NAME = "deltatune_virtual_tokens"
HEAD_NAMES = ["classifier", "score"]  # PEFT trains these by default on classification models
CLASSIFICATION_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification")


class VirtualTokenHost(AdapterHost):
    """Holds every prompt-family adapter of a model (``self.adapters[name]``) and applies the active ones.

    It stands for no base module: ``unwrap()`` removes the hook and returns ``None`` (the host is then removed).
    """

    def __init__(self, root: nn.Module) -> None:
        super().__init__(nn.Module())
        self.adapters = nn.ModuleDict()
        self.__dict__["root"] = root  # plain attribute: the root is our parent, not a child
        self.__dict__["_signature"] = inspect.signature(root.forward)
        self.__dict__["_handle"] = root.register_forward_pre_hook(self._hook, with_kwargs=True)

    def adapter_names(self) -> list[str]:
        return list(self.adapters.keys())

    def adapter_module(self, name: str) -> nn.Module | None:
        return self.adapters[name] if name in self.adapters else None

    def remove_adapter(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]

    def unwrap(self) -> None:  # type: ignore[override]
        self._handle.remove()
        return None

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT stores a prompt-family adapter as one tensor ``prompt_embeddings`` (the encoder's output)."""
        return {"prompt_embeddings": self.adapters[name].stored()} if name in self.adapters else {}

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters.keys())}"

    # ---- the forward transform -----------------------------------------------------------------------------------
    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if self.disabled:
            return None
        if self.row_adapters is not None:  # a mixed batch: per-row virtual tokens where exact (batching/virtual.py)
            if not any(r in self.adapters for r in self.row_adapters):
                return None
            kwargs = self._bind(args, kwargs)
            return (), strategy("mixed_virtual_tokens")(self.root, self._signature, kwargs, self.row_adapters, self.adapters)
        modules = [self.adapters[n] for n in self.active if n in self.adapters]
        if not modules:
            return None
        return (), add_virtual_tokens(self.root, self._bind(args, kwargs), modules)

    def _bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Name the positional arguments so that every input can be rewritten by name."""
        if not args:
            return dict(kwargs)
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = [p.name for p in self._signature.parameters.values() if p.kind in kinds]
        if len(args) > len(names):
            raise ConfigError(f"{type(self.root).__name__} got {len(args)} positional arguments; pass inputs by name")
        return {**dict(zip(names, args)), **kwargs}


def add_virtual_tokens(root: nn.Module, kwargs: dict[str, Any], modules: list[nn.Module]) -> dict[str, Any]:
    """Rewrite one forward call's keyword arguments for the given active virtual-token modules (see module doc)."""
    from transformers.cache_utils import Cache, DynamicCache

    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    ref = embeds if embeds is not None else ids
    if ref is None:
        raise ConfigError("prompt/prefix adapters need input_ids or inputs_embeds")
    batch, device = ref.shape[0], ref.device
    out = dict(kwargs)
    cache = pop_cache(out)
    if cache is not None and not isinstance(cache, Cache):
        raise ConfigError("the KV cache must be a transformers Cache (e.g. DynamicCache), not a legacy tuple")
    prefill = cache is None or cache.get_seq_length() == 0
    prompts = [m for m in modules if m.kind == "prompt"]
    prefixes = [m for m in modules if m.kind == "prefix"]
    n_kv = sum(m.num_virtual_tokens for m in prefixes)
    n_total = n_kv + sum(m.num_virtual_tokens for m in prompts)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ConfigError("prompt/prefix adapters need a 2-D attention_mask [batch, seq] (or none)")
        out["attention_mask"] = torch.cat([mask.new_ones(batch, n_total), mask], dim=1)
    if prefill and prefixes:
        cache = cache if cache is not None else DynamicCache(config=getattr(root, "config", None))
        write_prefix(cache, prefixes, batch, device, input_embeddings(root).weight.dtype)
    put_cache(out, root, cache)
    if prefill and prompts:
        if embeds is None:
            embeds = root.get_input_embeddings()(ids)
        virtual = torch.cat([m() for m in prompts], dim=0).to(device=device, dtype=embeds.dtype)
        out["inputs_embeds"] = torch.cat([virtual.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
        out["input_ids"] = None
        n_prompt = n_total - n_kv
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels.shape[1] == embeds.shape[1]:
            out["labels"] = torch.cat([labels.new_full((labels.shape[0], n_prompt), -100), labels], dim=1)
        if kwargs.get("token_type_ids") is not None:
            types = kwargs["token_type_ids"]
            out["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], n_prompt), types], dim=1)
    for key in ("position_ids", "cache_position"):
        value = kwargs.get(key)
        if value is None:
            continue
        shifted = value + n_total
        if prefill and prompts:  # positions of the prompt-kind virtual tokens come first
            lead = torch.arange(n_kv, n_total, device=value.device, dtype=value.dtype)
            lead = lead.expand(*value.shape[:-1], -1) if value.dim() > 1 else lead
            shifted = torch.cat([lead, shifted], dim=-1)
        out[key] = shifted
    return out


def write_prefix(cache: Any, prefixes: list[nn.Module], batch: int, device: torch.device, dtype: torch.dtype) -> None:
    """Append each prefix module's per-layer keys/values ``[batch, heads, P, head_dim]`` to the cache."""
    per_module = [m.key_values() for m in prefixes]
    num_layers = len(per_module[0])
    if any(len(kv) != num_layers for kv in per_module):
        raise ConfigError("active prefix adapters disagree on the number of layers")
    for layer in range(num_layers):
        keys = torch.cat([kv[layer][0] for kv in per_module], dim=1).to(device=device, dtype=dtype)
        values = torch.cat([kv[layer][1] for kv in per_module], dim=1).to(device=device, dtype=dtype)
        positions = torch.arange(keys.shape[1], device=device)
        cache.update(
            keys.unsqueeze(0).expand(batch, -1, -1, -1),
            values.unsqueeze(0).expand(batch, -1, -1, -1),
            layer,
            {"cache_position": positions},
        )


# ---- config ----------------------------------------------------------------------------------------------------
def model_dims(root: nn.Module) -> dict[str, int]:
    """hidden size, layer count, attention heads, key/value heads and head size read from the model's config."""
    config = getattr(root, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def first(*names: str) -> int | None:
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return None

    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head", "num_heads")
    layers = first("num_hidden_layers", "n_layer", "num_layers")
    kv_heads = first("num_key_value_heads") or heads
    head_dim = first("head_dim") or (hidden // heads if hidden and heads else None)
    return {"hidden": hidden, "heads": heads, "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim}


@dataclass
class VirtualTokenConfig(DeltaConfig):
    """Fields shared by the prompt family (PEFT's ``PromptLearningConfig``); ``None`` dims are read from the model.

    num_virtual_tokens: P, the number of virtual tokens; token_dim: width of one virtual token (hidden size; for
    prefixes ``kv_heads * head_dim``); num_layers / num_attention_heads: the model's (for prefixes: key/value heads).
    modules_to_save: ``None`` trains the classification head (``classifier``/``score``) on classification models,
    as PEFT does; pass ``[]`` to keep it frozen.
    """

    peft_keys: ClassVar[dict[str, str]] = {
        "modules_to_save": "modules_to_save", "base_model_name_or_path": "base_model_name_or_path",
        "task_type": "task_type",
        "num_virtual_tokens": "num_virtual_tokens", "token_dim": "token_dim", "num_layers": "num_layers",
        "num_attention_heads": "num_attention_heads", "num_transformer_submodules": "num_transformer_submodules",
    }
    mergeable: ClassVar[bool] = False
    file_prefix: ClassVar[str] = "base_model."
    file_root_keys: ClassVar[frozenset[str]] = frozenset({"prompt_embeddings"})

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int | None = 1

    def validate(self) -> None:
        super().validate()
        for name in ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_transformer_submodules not in (None, 1):
            raise ConfigError(
                f"num_transformer_submodules={self.num_transformer_submodules}: encoder-decoder models are not "
                f"supported by deltatune's prompt family; use an encoder or a decoder-only model"
            )
        if self.targets is not None or self.exclude is not None or self.layers is not None:
            raise ConfigError(f"{type(self).__name__} adds virtual tokens at model level; it takes no targets/layers")

    def filled(self, root: nn.Module) -> VirtualTokenConfig:
        """This config with the model-dependent dimensions filled in."""
        raise NotImplementedError

    def create_module(self, root: nn.Module) -> nn.Module:
        """The adapter's virtual-token module (``kind``, ``num_virtual_tokens``, ``forward()``, ``stored()``)."""
        raise NotImplementedError

    def for_loading(self) -> VirtualTokenConfig:
        """The form a file's ``prompt_embeddings`` fill, built when ``initialising()`` is False: the stored virtual
        tokens without an encoder (P-tuning) or prefix projection (prefix tuning); the same form by default."""
        return self

    def inject(self, model: DeltaModel, name: str, paths: list[str]) -> None:
        root = model.model
        if getattr(getattr(root, "config", None), "is_encoder_decoder", False):
            raise TargetError(
                f"{type(root).__name__} is an encoder-decoder model; deltatune's prompt/prefix methods support "
                f"encoders and decoder-only models"
            )
        config = self.filled(root)
        module = (config if initialising() else config.for_loading()).create_module(root)
        embeddings = root.get_input_embeddings() if hasattr(root, "get_input_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        if weight is not None:
            place(module, weight.device, adapter_dtype(weight.dtype))
        if config.modules_to_save is None:
            heads = default_heads(root)
            for path in heads:
                model.host_at(path, TrainableCopies).add_copy(name)
            config = config.replace(modules_to_save=heads or None)
        host = root._modules.get(HOST_NAME)
        if not isinstance(host, VirtualTokenHost):
            host = VirtualTokenHost(root)
            root.add_module(HOST_NAME, host)
        host.adapters[name] = module
        model.configs[name] = config


def default_heads(root: nn.Module) -> list[str]:
    """The classification head paths PEFT trains by default (only on *ForSequence/TokenClassification models)."""
    if not type(root).__name__.endswith(CLASSIFICATION_SUFFIXES):
        return []
    try:
        return resolve_modules_to_save(root, HEAD_NAMES)
    except TargetError:
        return []


def input_embeddings(root: nn.Module) -> nn.Module:
    get = getattr(root, "get_input_embeddings", None)
    module = get() if callable(get) else None
    if not isinstance(module, nn.Module) or getattr(module, "weight", None) is None:
        raise TargetError(
            f"{type(root).__name__} has no get_input_embeddings(); prompt/prefix methods need a transformers-style model"
        )
    return module
