"""DeltaModel: a frozen base model plus named adapters (add/set/delete, disable, merge/unmerge/unload)."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import DeltaConfig
from .errors import ConfigError, MergeError
from .layers import BASE, AdapterHost, DeltaLayer, TrainableCopies, claim, wrapper_of
from .merging import merge_adapters
from .protocol import no_init, strategy
from .targets import base_modules, get_module, resolve_modules_to_save, resolve_targets, set_module

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name) or name == BASE:
        raise ConfigError(
            f"adapter name {name!r} is invalid: use letters, digits, '_' or '-' (no dots; {BASE!r} is reserved)"
        )


class DeltaModel(nn.Module):
    """A base model (frozen, never copied) carrying named adapters; ``forward`` runs the active ones.

    ``self.model`` is the base model itself, modified in place: adapted layers are replaced by transparent hosts that keep the
    base's parameter names, so ``model.model.state_dict()`` has the base's keys (plus adapter keys) and ``load_state_dict``
    accepts a plain base checkpoint. Saving, loading, combining and hot-swapping run the implementations that
    ``deltatune.io``, ``deltatune.combine`` and ``deltatune.hotswap`` install (``deltatune.protocol`` strategies)."""

    def __init__(self, model: nn.Module, config: DeltaConfig, name: str = "default", *, init: bool = True) -> None:
        super().__init__()
        if isinstance(model, DeltaModel) or getattr(wrapper_of(model), "configs", None):
            raise ConfigError("model is already a DeltaModel or wrapped by one; use its add_adapter, or wrap a copy")
        self.model = model
        self.configs: dict[str, DeltaConfig] = {}
        self._active: list[str] = []
        self._bias_trainable: set[str] = set()
        self._base_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self._register_load_state_dict_pre_hook(self._accept_base_keys, with_module=True)
        try:
            self.add_adapter(name, config, init=init)
        except BaseException:
            self.restore_requires_grad()
            raise
        self.set_adapter(name)
        claim(model, self)

    def restore_requires_grad(self) -> None:
        """Give base parameters back the ``requires_grad`` flags they had before wrapping."""
        for parameter, flag in self._base_requires_grad:
            parameter.requires_grad_(flag)

    # ---- attribute passthrough ---------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self._modules.get("model")
            if model is None:
                raise
            return getattr(model, name)

    # ---- adapters ----------------------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0] if self._active else ""

    def hosts(self) -> Iterator[tuple[str, AdapterHost]]:
        for path, module in self.model.named_modules():
            if isinstance(module, AdapterHost):
                yield path, module

    def _changed(self) -> None:
        """Note a change of which modules are hosts (invalidates ``_host_list``)."""
        self.__dict__["_structure"] = self.__dict__.get("_structure", 0) + 1

    def _host_list(self) -> list[AdapterHost]:
        """Every host, cached between structural changes made through this DeltaModel (mixed batches call this on
        every forward; walking every module of a model with many adapters costs milliseconds)."""
        stamp = (self.__dict__.get("_structure", 0), tuple((n, id(c)) for n, c in self.configs.items()))
        cached = self.__dict__.get("_hosts_cache")
        if cached is None or cached[0] != stamp:
            cached = (stamp, [host for _, host in self.hosts()])
            self.__dict__["_hosts_cache"] = cached
        return cached[1]

    def host_at(self, path: str, kind: type[AdapterHost]) -> AdapterHost:
        """The host of the module at ``path``, wrapping the plain module on first use."""
        module = get_module(self.model, path)
        if isinstance(module, kind):
            return module
        if isinstance(module, AdapterHost):
            raise ConfigError(f"module '{path}' already carries a {type(module).__name__}; it cannot also be a {kind.__name__}")
        host = kind(module)
        set_module(self.model, path, host)
        self._changed()
        return host

    def add_adapter(self, name: str, config: DeltaConfig, *, init: bool = True) -> None:
        """Add an adapter (inactive unless it is the first); on any error the model is left as it was.

        ``init=False`` builds it for the caller to fill, as ``deltatune.io.load`` does: no delta runs its
        initialisation, and every tensor an adapter file holds is an empty meta tensor until
        ``deltatune.filling.fill`` gives it its value (what a delta computes at build time that no file holds, such
        as MoRA's rotation tables, is computed as usual; see ``protocol.no_init``). A method whose file holds another
        form than it trains is built in the file's form (P-tuning: the virtual tokens without their encoder), while
        ``configs[name]`` holds the real config either way. Fill the adapter before using or moving the model.
        """
        check_adapter_name(name)
        if name in self.configs:
            raise ConfigError(f"adapter '{name}' already exists; delete_adapter('{name}') first or pick another name")
        if not isinstance(config, DeltaConfig):
            raise ConfigError(f"config must be a deltatune config such as LoraConfig, got {type(config).__name__}")
        if config.targets is None and config.per_layer:
            config = config.replace(targets=config.default_targets(self.model))
        if config.base_model_name_or_path is None:
            config = config.replace(base_model_name_or_path=getattr(getattr(self.model, "config", None), "_name_or_path", None) or None)
        paths: list[str] = []
        if config.per_layer:
            paths = resolve_targets(
                self.model, config.targets, config.exclude, config.layers, config.layers_pattern, config.is_supported
            )
        save_paths = resolve_modules_to_save(self.model, config.modules_to_save) if config.modules_to_save else []
        self.configs[name] = config
        self._changed()
        try:
            with contextlib.nullcontext() if init else no_init():
                config.inject(self, name, paths)
                for path in save_paths:
                    self.host_at(path, TrainableCopies).add_copy(name)
        except BaseException:
            self._remove(name)
            raise
        self._refresh()

    def set_adapter(self, names: str | list[str]) -> None:
        """Make ``names`` the active adapters (several active adapters sum their deltas)."""
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            if name not in self.configs:
                raise ConfigError(f"no adapter named '{name}'; adapters: {', '.join(self.configs) or 'none'}")
        merged = self.merged_adapters
        if merged and set(merged) - set(names):
            raise MergeError(f"adapters {merged} are merged into the weights; call model.unmerge() before switching")
        self._active = names
        self._refresh()

    def delete_adapter(self, name: str) -> None:
        if name not in self.configs:
            raise ConfigError(f"no adapter named '{name}'; adapters: {', '.join(self.configs) or 'none'}")
        if name in self.merged_adapters:
            raise MergeError(f"adapter '{name}' is merged into the weights; call model.unmerge() first")
        self._remove(name)
        self._active = [a for a in self._active if a != name]
        self._refresh()

    def _remove(self, name: str) -> None:
        """Remove every trace of adapter ``name``; hosts left without adapters give their module back."""
        self.configs.pop(name, None)
        self._changed()
        for path, host in list(self.hosts()):
            host.remove_adapter(name)
            if not host.adapter_names():
                set_module(self.model, path, host.unwrap())

    def _refresh(self) -> None:
        """Push the active set to every host and set ``requires_grad`` on adapter parameters."""
        active = tuple(self._active)
        for _, host in self.hosts():
            host.active = active
            holders = host.copies if isinstance(host, TrainableCopies) else host.adapters
            for adapter_name, holder in holders.items():
                for parameter in holder.parameters():
                    if not getattr(parameter, "_deltatune_frozen", False):
                        parameter.requires_grad_(adapter_name in active)
        self._refresh_bias(active)

    def _refresh_bias(self, active: tuple[str, ...]) -> None:
        modes = {self.configs[a].bias for a in active if getattr(self.configs[a], "bias", "none") != "none"}
        wanted = set(bias_parameter_paths(self, modes))
        for path, parameter in self.model.named_parameters():
            if path in wanted:
                parameter.requires_grad_(True)
            elif path in self._bias_trainable:
                parameter.requires_grad_(False)
        self._bias_trainable = wanted

    # ---- behaviour switches ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Inside the block the model computes exactly the base model's outputs."""
        if self.merged_adapters:
            raise MergeError(f"adapters {self.merged_adapters} are merged into the weights; call model.unmerge() first")
        hosts = [host for _, host in self.hosts()]
        previous = [host.disabled for host in hosts]
        for host in hosts:
            host.disabled = True
        try:
            yield
        finally:
            for host, was in zip(hosts, previous):
                host.disabled = was

    @contextlib.contextmanager
    def _row_adapters(self, names: list[str] | None) -> Iterator[None]:
        if names is None:
            yield
            return
        unknown = sorted({n for n in names if n != BASE and n not in self.configs})
        if unknown:
            raise ConfigError(f"adapter_names has unknown adapters {unknown}; known: {sorted(self.configs)} and {BASE!r}")
        hosts = self._host_list()
        for host in hosts:
            host.row_adapters = list(names)
        try:
            yield
        finally:
            for host in hosts:
                host.row_adapters = None

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward with the active adapters; ``adapter_names`` picks one adapter per row."""
        with self._row_adapters(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        with self._row_adapters(adapter_names):
            return self.model.generate(*args, **kwargs)

    # ---- merging -----------------------------------------------------------------------------------------------
    @property
    def merged_adapters(self) -> list[str]:
        merged: list[str] = []
        for _, host in self.hosts():
            if isinstance(host, DeltaLayer):
                merged += [m for m in host.merged if m not in merged]
        return merged

    def merge(self, names: list[str] | str | None = None, safe: bool = True, skip_unmergeable: bool = False) -> list[str]:
        """Add the adapters' deltas into the base weights (computed in float32); ``safe`` refuses NaN/inf.

        Adapters that are not weight updates (bottleneck adapters, prompts, prefixes) raise ``MergeError``, unless
        ``skip_unmergeable``: then only the mergeable ones are merged, the others stay live (a warning lists them).
        Returns the names left unmerged. All or nothing: a refused merge changes no weight (``deltatune.merging``).
        """
        names = self._active if names is None else ([names] if isinstance(names, str) else list(names))
        return merge_adapters(self, names, safe, skip_unmergeable)

    def unmerge(self) -> None:
        """Subtract every merged delta again (restores the weights up to float32 rounding)."""
        for _, host in self.hosts():
            if isinstance(host, DeltaLayer):
                host.unmerge()

    def merge_and_unload(
        self, names: list[str] | str | None = None, safe: bool = True, dequantize: bool = False
    ) -> nn.Module:
        """Merge, then return the plain base model (its own classes, no wrapper left).

        ``dequantize``: first replace 4-bit layers (``quantize_nf4``, bitsandbytes) by dense ``nn.Linear`` holding
        their dequantized weights, so the result is dense and each merged weight is exactly ``dequant(W) + dW``.
        """
        if dequantize:
            strategy("dequantize_model")(self.model)
        self.merge(names, safe=safe)
        return self.unload(keep=names)

    def unload(self, keep: list[str] | str | None = None) -> nn.Module:
        """Remove every adapter without merging (merged deltas stay in the weights) and return the base model.

        modules_to_save hosts are replaced by the copy of the first adapter in ``keep`` (default: the active ones).
        """
        keep = self._active if keep is None else ([keep] if isinstance(keep, str) else list(keep))
        self._changed()
        for path, host in list(self.hosts()):
            replacement = host.unwrap_to(keep) if isinstance(host, TrainableCopies) else host.unwrap()
            set_module(self.model, path, replacement)
        model = self.model
        self.configs.clear()
        self._active = []
        return model

    # ---- parameters and state ----------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
    def count_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, adapters included in the total."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable(self) -> str:
        trainable, total = self.count_parameters()
        line = f"trainable: {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.2f}%)"
        print(line)
        return line

    # ---- files and adapter arithmetic (implemented in the layers above; see the class docstring) -----------------
    def save(self, directory: str, adapter: str | None = None, **kwargs: Any) -> None:
        """Write adapters in the PEFT layout (see ``deltatune.io.save``)."""
        strategy("save")(self, directory, adapter=adapter, **kwargs)

    def load_adapter(self, directory: str, name: str = "default", **kwargs: Any) -> DeltaModel:
        """Add adapter ``name`` from a folder (see ``deltatune.io.load``)."""
        return strategy("load")(self, directory, name=name, **kwargs)

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "svd",
        svd_rank: int | None = None, density: float | None = None, majority_sign_method: str = "total",
        seed: int = 0, modules_to_save_from: str | None = None,
    ) -> Any:
        """Add LoRA adapter ``adapter_name``, the weighted combination of ``adapters`` defined on their dense
        task vectors ``dW_i`` (``cat``: exactly ``sum_i w_i dW_i``; other types: truncated SVD, error reported in
        the returned ``deltatune.combine.CombineReport``). See ``deltatune.combine``."""
        return strategy("add_weighted_adapter")(
            self, adapters, weights, adapter_name, combination_type, svd_rank, density, majority_sign_method, seed,
            modules_to_save_from,
        )

    def prepare_for_hotswap(self, max_rank: int, names: list[str] | None = None) -> None:
        """Pad LoRA adapters to rank ``max_rank`` (scaling folded into B) so later swaps keep every shape; call
        it before ``torch.compile``."""
        strategy("prepare_for_hotswap")(self, max_rank, names)

    def hotswap_adapter(
        self, source: str | os.PathLike | dict[str, torch.Tensor], name: str, config: DeltaConfig | None = None
    ) -> None:
        """Replace adapter ``name``'s weights in place by those of a LoRA adapter folder (or a PEFT-layout state
        dict with its ``config``): a compiled model does not recompile. See ``deltatune.hotswap``."""
        strategy("hotswap_adapter")(self, source, name, config)

    def _accept_base_keys(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        """Let ``load_state_dict`` take a plain base checkpoint: keys without the ``model.`` prefix are mapped."""
        own = {k[len("model."):] for k in self.state_dict() if k.startswith("model.")}
        for key in list(state_dict):
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if rest in own and not (rest.startswith("model.") and rest[len("model."):] in own):
                state_dict[prefix + "model." + rest] = state_dict.pop(key)


def bias_parameter_paths(model: DeltaModel, modes: set[str]) -> list[str]:
    """Paths (under ``model.model``) of the biases that ``bias="all"`` / ``"lora_only"`` adapters train."""
    if not modes:
        return []
    adapted = {path for path, host in model.hosts() if isinstance(host, DeltaLayer)}
    return [
        f"{path}.bias"
        for path, module in base_modules(model.model)
        if isinstance(module._parameters.get("bias"), torch.Tensor) and ("all" in modes or path in adapted)
    ]


def wrap(model: nn.Module, config: DeltaConfig, name: str = "default") -> DeltaModel:
    """Freeze ``model`` in place and add adapter ``name`` built from ``config``; returns the ``DeltaModel``."""
    return DeltaModel(model, config, name)
