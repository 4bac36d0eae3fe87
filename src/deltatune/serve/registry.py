"""Adapter registry: known adapters (name -> folder) and a bounded set loaded on one base model (LRU hot-swap).

Adapters are registered by folder and loaded lazily on first use; when ``max_loaded`` adapters are in memory the
least recently used one not needed by the current batch is deleted from the model (the base is never reloaded).
Security: a folder must lie inside one of ``allowed_dirs`` (after resolving symlinks and ``..``) and hold
``adapter_config.json`` + ``adapter_model.safetensors``; pickled ``adapter_model.bin`` files are never read.
All methods take one lock, so HTTP handlers and the batch worker may call them from different threads.
"""

from __future__ import annotations

import inspect
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from ..batching.virtual import CAUSAL_SUFFIXES
from ..config import check_positive_int
from ..errors import AdapterFileError, ConfigError, DeltatuneError
from ..io import CONFIG_NAME, WEIGHTS_NAME, load, read_config
from ..layers import BASE
from ..methods.base import LayerDeltaConfig
from ..methods.prefix import PrefixTuningConfig
from ..model import DeltaModel, check_adapter_name
from .compiled import CompiledSlots


class ServeError(DeltatuneError):
    """A request the server refuses; ``status`` is the HTTP status code to answer with."""

    status = 400


class UnknownAdapter(ServeError):
    status = 404


class Forbidden(ServeError):
    status = 403


class Conflict(ServeError):
    status = 409


MAX_NAME = 128  # adapter names are echoed in errors and /health; longer ones are refused, not stored
MAX_PATH = 4096


def shown(name: str) -> str:
    """``name`` as echoed in messages: cut to ``MAX_NAME`` characters."""
    return name if len(name) <= MAX_NAME else f"{name[:MAX_NAME]}... ({len(name):,} characters)"


def check_path_text(path: str | Path) -> None:
    """Refuse path strings no file system accepts (NUL bytes, over ``MAX_PATH`` characters) with a 400."""
    text = str(path)
    if "\x00" in text:
        raise ServeError("the adapter path contains a NUL byte; send a plain folder path")
    if len(text) > MAX_PATH:
        raise ServeError(f"the adapter path has {len(text):,} characters; at most {MAX_PATH} are accepted")


class AdapterRegistry:
    """Adapters known by name; at most ``max_loaded`` of them live on ``base`` at once (least recently used go)."""

    def __init__(
        self, base: nn.Module, allowed_dirs: Iterable[str | Path] = (), max_loaded: int = 8,
        compiled: CompiledSlots | None = None,
    ) -> None:
        """``compiled``: serve from a ``torch.compile``'d base whose adapters are hot-swapped into fixed slots
        (``serve --compile``; see ``deltatune.serve.compiled``)."""
        check_positive_int("max_loaded", max_loaded)
        self.base = base
        self.model: DeltaModel | None = None
        self.allowed_dirs = [Path(d).expanduser().resolve() for d in allowed_dirs]
        self.max_loaded = max_loaded
        self.sources: dict[str, Path] = {}
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.loads = 0
        self.evictions = 0
        self.combined_dir: Path | None = None  # where combinations made by ``combine`` are written
        self.compiled = compiled
        self.lock = threading.RLock()

    # ---- which folders may be read -------------------------------------------------------------------------------
    def allow(self, directory: str | Path) -> None:
        with self.lock:
            resolved = Path(directory).expanduser().resolve()
            if resolved not in self.allowed_dirs:
                self.allowed_dirs.append(resolved)

    def checked_folder(self, path: str | Path) -> Path:
        """``path`` resolved, if it is an adapter folder inside an allowed folder; else a ``ServeError``. The files
        it reads are resolved too: a symlink inside the folder that points outside the allowed folders is refused."""
        check_path_text(path)
        resolved = Path(path).expanduser().resolve()
        if not self._inside(resolved):
            raise Forbidden(
                f"adapter folder {path} is outside the allowed folders; start the server with --allow-dir for it"
            )
        if not resolved.is_dir():
            raise AdapterFileError(f"adapter folder {path} does not exist")
        if not (resolved / CONFIG_NAME).is_file():
            raise AdapterFileError(f"{path} has no {CONFIG_NAME}; point at a folder written by model.save() or PEFT")
        if not (resolved / WEIGHTS_NAME).is_file():
            raise AdapterFileError(f"{path} has no {WEIGHTS_NAME}; the server only reads safetensors adapter files")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not self._inside((resolved / name).resolve()):
                raise Forbidden(f"{path}/{name} is a link to a file outside the allowed folders; copy the file instead")
        return resolved

    def _inside(self, resolved: Path) -> bool:
        return any(resolved == root or resolved.is_relative_to(root) for root in self.allowed_dirs)

    # ---- registering -------------------------------------------------------------------------------------------
    def add(self, name: str, path: str | Path, load_now: bool = False) -> None:
        """Register adapter ``name`` at ``path`` (loaded on first use, or now with ``load_now``)."""
        with self.lock:
            if not isinstance(name, str) or len(name) > MAX_NAME:
                raise ServeError(f"adapter name {shown(str(name))!r} is longer than {MAX_NAME} characters; pick a shorter one")
            try:
                check_adapter_name(name)
            except ConfigError as error:
                raise ServeError(str(error)) from None
            folder = self.checked_folder(path)
            if name in self.sources:
                raise Conflict(f"adapter '{name}' already exists; DELETE /v1/adapters/{name} first or pick another name")
            read_config(folder)  # a broken config is refused now, not at the first request
            self.sources[name] = folder
            if load_now:
                try:
                    self.ensure([name])
                except BaseException:
                    self.sources.pop(name, None)
                    raise

    def combine(self, name: str, adapters: list[str], weights: list[float], **options: Any) -> dict[str, Any]:
        """Register adapter ``name`` = a weighted combination of registered adapters (``add_weighted_adapter``,
        ``options`` as there). It is written to a folder of the registry's own, so it is evicted and reloaded like
        any other adapter. Returns the combination's achieved relative error and ranks."""
        with self.lock:
            try:
                check_adapter_name(name)
            except ConfigError as error:
                raise ServeError(str(error)) from None
            if name in self.sources:
                raise Conflict(f"adapter '{name}' already exists; DELETE /v1/adapters/{name} first or pick another name")
            if len(set(adapters)) >= self.max_loaded:
                raise ServeError(f"combining {len(set(adapters))} adapters needs them and the result loaded at once; "
                                 f"start the server with --max-loaded {len(set(adapters)) + 1} or more")
            self.ensure(adapters)
            while len(self.loaded) >= self.max_loaded:
                self.unload(next(n for n in self.loaded if n not in adapters))
                self.evictions += 1
            assert self.model is not None
            inputs = [self.row_name(a) for a in adapters]
            if options.get("modules_to_save_from"):
                options = {**options, "modules_to_save_from": self.row_name(options["modules_to_save_from"])}
            report = self.model.add_weighted_adapter(inputs, weights, name, **options)
            if self.combined_dir is None:
                self.combined_dir = Path(tempfile.mkdtemp(prefix="deltatune-combined-"))
                self.allow(self.combined_dir)  # the server's own folder: an evicted combination reloads from it
            try:
                self.model.save(self.combined_dir / name, adapter=name)
            except BaseException:
                self.model.delete_adapter(name)
                raise
            if self.compiled is not None:  # compiled: the file is swapped into a slot at first use
                self.model.delete_adapter(name)
            self.sources[name] = self.combined_dir / name
            if self.compiled is None:
                self.loaded[name] = None
            return {"relative_error": report.relative_error, "ranks": sorted(set(report.ranks.values()))}

    def scan(self, directory: str | Path) -> list[str]:
        """Register an adapter folder (named after the folder) or every adapter folder directly inside ``directory``."""
        root = Path(directory).expanduser()
        if (root / CONFIG_NAME).is_file():
            folders = [root]
        elif root.is_dir():
            folders = sorted(p for p in root.iterdir() if (p / CONFIG_NAME).is_file())
        else:
            raise AdapterFileError(f"adapter folder {directory} does not exist")
        for folder in folders:
            self.add(folder.name, folder)
        return [folder.name for folder in folders]

    def remove(self, name: str) -> None:
        """Forget adapter ``name`` (deleting it from the model when loaded)."""
        with self.lock:
            self.require(name)
            self.unload(name)
            del self.sources[name]

    def require(self, name: str) -> None:
        if name != BASE and name not in self.sources:
            known = ", ".join(sorted(self.sources)[:20]) or "none"
            raise UnknownAdapter(f"no adapter named '{shown(name)}'; known adapters: {known} (or omit model for the base)")

    # ---- loading and eviction ----------------------------------------------------------------------------------
    def ensure(self, names: Iterable[str]) -> None:
        """Load every adapter in ``names`` that is not in memory, evicting least recently used others."""
        with self.lock:
            wanted = [n for n in dict.fromkeys(names) if n != BASE]
            for name in wanted:
                self.require(name)
            if len(wanted) > self.max_loaded:
                raise ServeError(f"a batch needs {len(wanted)} adapters but at most {self.max_loaded} may be loaded")
            for name in wanted:
                if name in self.loaded:
                    self.loaded.move_to_end(name)
                    continue
                while len(self.loaded) >= self.max_loaded:
                    victim = next(n for n in self.loaded if n not in wanted)
                    self.unload(victim)
                    self.evictions += 1
                self._load(name)

    def _load(self, name: str) -> None:
        target = self.model if self.model is not None else self.base
        self.checked_folder(self.sources[name])  # again: a link may have been swapped in since it was registered
        try:
            if self.compiled is not None:
                model = self.compiled.load(self.base, self.model, name, self.sources[name])
            else:
                model = load(target, self.sources[name], name=name, activate=False)
        except DeltatuneError:
            raise
        except Exception as error:  # e.g. a tensor shape torch refuses
            raise AdapterFileError(f"adapter '{name}' could not be loaded: {error}") from error
        self.model = model.eval()
        self.loaded[name] = None
        self.loads += 1

    def unload(self, name: str) -> None:
        """Delete adapter ``name`` from the model (it stays registered and reloads on next use)."""
        with self.lock:
            if name in self.loaded:
                assert self.model is not None
                if self.compiled is not None:
                    self.compiled.unload(name)
                else:
                    self.model.delete_adapter(name)
                del self.loaded[name]

    # ---- using ---------------------------------------------------------------------------------------------------
    def row_name(self, name: str) -> str:
        """The ``adapter_names`` entry of adapter ``name`` in the model (its slot when compiled)."""
        return self.compiled.slot_of(name) if self.compiled is not None and name in self.loaded else name

    def _config(self, name: str) -> Any:
        return self.model.configs.get(self.row_name(name)) if self.model is not None else None

    def runner(self) -> nn.Module:
        """The module to call: the ``DeltaModel`` once any adapter was loaded, else the plain base."""
        return self.model if self.model is not None else self.base

    def batchable(self, name: str) -> bool:
        """Whether ``name`` can share a mixed batch exactly, or must run alone.

        Layer methods always can; prefix tuning / P-tuning v2 can when the model takes ``position_ids``; prompt
        tuning / P-tuning only in causal LMs (their rows are padded to the widest prompt; see ``virtual.py``).
        """
        config = self._config(name)
        if config is None or isinstance(config, LayerDeltaConfig):
            return True
        if "position_ids" not in inspect.signature(self.base.forward).parameters:
            return False
        if isinstance(config, PrefixTuningConfig):
            return True
        return type(self.base).__name__.endswith(CAUSAL_SUFFIXES)

    def describe(self) -> list[dict[str, Any]]:
        with self.lock:
            rows = []
            for name in sorted(self.sources):
                entry: dict[str, Any] = {"name": name, "loaded": name in self.loaded}
                config = self._config(name)
                if config is not None:
                    entry["method"] = getattr(type(config), "method", type(config).__name__)
                rows.append(entry)
            return rows
