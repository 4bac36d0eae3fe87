"""Which modules a config touches: exact/suffix names, full-match regex, "all-linear", layer filters, exclusions."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator

from torch import nn

from .errors import TargetError
from .layers import SUPPORTED_TYPES, AdapterHost, DeltaLayer, TrainableCopies, layer_kind

HEAD_NAMES = {"lm_head", "classifier", "score", "qa_outputs", "cls", "embed_out", "output_layer"}
LAYER_CONTAINERS = ("layers", "layer", "h", "blocks", "block")

# architecture (transformers model_type) -> default targets, as PEFT and the papers use them
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"], "deberta-v2": ["query_proj", "value_proj"], "electra": ["query", "value"],
    "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"], "opt": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "t5": ["q", "v"],
}


def base_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for the model's own modules; adapter internals are skipped, hosts count as their base."""
    if isinstance(model, TrainableCopies):
        return
    for name, child in model.named_children():
        if isinstance(model, DeltaLayer) and name == "adapters":
            continue
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        yield from base_modules(child, path)


def layer_index(path: str, pattern: str | list[str] | None = None) -> int | None:
    """Block index of a module path: ``encoder.layer.3.attention`` -> 3 (first ``<container>.<int>`` found)."""
    names = [pattern] if isinstance(pattern, str) else list(pattern or LAYER_CONTAINERS)
    match = re.search(rf"(?:^|\.)(?:{'|'.join(map(re.escape, names))})\.(\d+)(?:\.|$)", path)
    return int(match.group(1)) if match else None


def name_matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def is_head(path: str, model: nn.Module) -> bool:
    if any(part in HEAD_NAMES for part in path.split(".")):
        return True
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        try:
            head = get_output()
        except (AttributeError, NotImplementedError, TypeError):
            head = None
        if head is not None:
            for candidate_path, module in base_modules(model):
                if module is head or (isinstance(module, AdapterHost) and module.base_layer is head):
                    return candidate_path == path
    return False


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise TargetError(
        f"no default targets for model type {model_type or type(model).__name__}; pass targets=[...] "
        f"(module names), a regex, or 'all-linear'"
    )


def closest_names(name: str, paths: list[str]) -> list[str]:
    candidates = set()
    for path in paths:
        parts = path.split(".")
        for width in (1, 2, 3):
            candidates.add(".".join(parts[-width:]))
    return difflib.get_close_matches(name, sorted(candidates), n=5, cutoff=0.5)


def _select(paths: dict[str, nn.Module], spec: list[str] | str, model: nn.Module, what: str) -> set[str]:
    """Paths matched by ``spec``; a list entry or regex that matches nothing is an error with suggestions."""
    if isinstance(spec, str):
        if spec == "all-linear":
            return {
                p for p, m in paths.items() if layer_kind(m) in ("linear", "conv1d_t") and not is_head(p, model)
            }
        try:
            regex = re.compile(spec)
        except re.error as error:
            raise TargetError(f"{what} regex {spec!r} is invalid: {error}") from error
        found = {p for p in paths if regex.fullmatch(p)}
        if not found:
            raise TargetError(
                f"{what} regex {spec!r} matched no module (it must match the whole path, e.g. "
                f"'.*\\.query'); module paths look like: {', '.join(list(paths)[:5])}"
            )
        return found
    if not isinstance(spec, (list, tuple, set)) or not all(isinstance(s, str) for s in spec):
        raise TargetError(f"{what} must be a list of module names, a regex string or 'all-linear', got {spec!r}")
    found: set[str] = set()
    for name in spec:
        hits = {p for p in paths if name_matches(p, name)}
        if not hits:
            close = closest_names(name, list(paths))
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise TargetError(f"{what} '{name}' matched no module{hint}")
        found |= hits
    return found


def resolve_targets(
    model: nn.Module,
    targets: list[str] | str | None,
    exclude: list[str] | str | None = None,
    layers: list[int] | None = None,
    layers_pattern: str | list[str] | None = None,
    is_supported: Callable[[nn.Module], bool] = lambda m: layer_kind(m) is not None,
) -> list[str]:
    """Sorted module paths selected by a config; errors name the bad entry and the closest real names."""
    paths = dict(base_modules(model))
    spec = default_targets(model) if targets is None else targets
    chosen = _select(paths, spec, model, "target")
    if isinstance(spec, list):
        # a name that matched only unsupported modules (e.g. a whole attention block) is a mistake
        for name in spec:
            hits = [p for p in chosen if name_matches(p, name)]
            if hits and not any(is_supported(paths[p]) for p in hits):
                kinds = sorted({type(paths[p]).__name__ for p in hits})
                raise TargetError(
                    f"target '{name}' matches {', '.join(kinds)} modules, which this method cannot adapt "
                    f"(supported: {SUPPORTED_TYPES}); name their Linear children instead"
                )
    unsupported = [p for p in chosen if not is_supported(paths[p])]
    if isinstance(spec, str) and unsupported and len(unsupported) == len(chosen):
        kinds = sorted({type(paths[p]).__name__ for p in unsupported})
        raise TargetError(f"targets {spec!r} only match {', '.join(kinds)} modules; supported: {SUPPORTED_TYPES}")
    chosen -= set(unsupported)
    if exclude:
        chosen -= _select(paths, exclude, model, "exclude")
    if layers is not None:
        indices = {p: layer_index(p, layers_pattern) for p in chosen}
        present = {i for p, i in ((p, layer_index(p, layers_pattern)) for p in paths) if i is not None}
        if not present:
            raise TargetError("layers=... was given but no module path has a block index (like 'layer.3.')")
        missing = sorted(set(layers) - present)
        if missing:
            raise TargetError(f"layers {missing} do not exist; the model has blocks {min(present)}-{max(present)}")
        chosen = {p for p, i in indices.items() if i in set(layers)}
    copies = [p for p in chosen if any(isinstance(m, TrainableCopies) and (p == q or p.startswith(q + ".")) for q, m in paths.items())]
    if copies:
        raise TargetError(f"modules {copies[:3]} are inside modules_to_save; a module is either adapted or saved whole")
    if not chosen:
        raise TargetError(f"targets {spec!r} selected no module after exclude/layers filters")
    return sorted(chosen)


def resolve_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    """Paths of modules_to_save entries (same name rules as targets); each must match something."""
    paths = dict(base_modules(model))
    # lenient per entry (PEFT writes alternatives such as ["classifier", "score"]), strict when nothing matches
    found = {p for p in paths if any(name_matches(p, name) for name in names)}
    if not found:
        _select(paths, list(names), model, "modules_to_save")
    # keep outermost matches only
    return sorted(p for p in found if not any(p.startswith(q + ".") for q in found if q != p))


def get_module(model: nn.Module, path: str) -> nn.Module:
    module = model
    for part in path.split("."):
        module = module.base_layer if isinstance(module, DeltaLayer) and part not in module._modules else module
        module = getattr(module, part)
    return module


def set_module(model: nn.Module, path: str, new: nn.Module | None) -> None:
    """Put ``new`` at ``path``; ``None`` removes the module there (a host that stands for no base module)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    owners = [parent, parent.base_layer] if isinstance(parent, AdapterHost) else [parent]
    for owner in owners:
        if new is None:
            owner._modules.pop(leaf, None)
        else:
            owner._modules[leaf] = new
