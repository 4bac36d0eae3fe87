"""Adapter files in the HF PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are ``base_model.model.<module path>.<tensor>`` with no adapter name in them (``...query.lora_A.weight``);
biases of adapted layers are ``...<path>.base_layer.bias`` and modules_to_save copies ``...<path>.<tensor>``, as PEFT
writes them. Writes are atomic; a failed load leaves the model exactly as it was.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import _atomic_write, atomic_write, remove_stale_temps  # noqa: F401  (atomic_write: public here)
from .config import DeltaConfig
from .errors import AdapterFileError, ConfigError, DeltatuneError
from .filling import fill, unfilled
from .layers import DeltaLayer, TrainableCopies, layer_kind
from .methods import config_from_peft_dict
from .methods.lora_init import PRINCIPAL_INITS, principal_file_as_plain_lora
from .model import DeltaModel, bias_parameter_paths
from .protocol import register_strategy

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
MAX_CONFIG_BYTES = 16 * 2**20
SIZE_FIELDS = ("r", "num_virtual_tokens", "bottleneck")  # config sizes that are dimensions of the file's tensors
PREFIX = "base_model.model."
TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS", "ForCausalLM": "CAUSAL_LM", "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS", "ForConditionalGeneration": "SEQ_2_SEQ_LM",
}


# ---- what an adapter consists of ---------------------------------------------------------------------------------
def adapter_tensors(model: DeltaModel, name: str) -> dict[str, torch.Tensor]:
    """The live tensors of adapter ``name``, keyed as in the file (without the ``base_model.model.`` prefix)."""
    tensors: dict[str, torch.Tensor] = {}
    for path, host in model.hosts():
        chosen = host.file_tensors(name)  # model-level adapters (prompts, prefixes): keys chosen by the host
        if chosen is not None:
            tensors.update(chosen)
        elif isinstance(host, DeltaLayer) and name in host.adapters:  # its state dict, then adapter-level tensors
            tensors.update({f"{path}.{k}": t for k, t in host.adapters[name].state_dict(keep_vars=True).items()})
            tensors.update(host.adapters[name].shared_tensors())  # shared by all its deltas: one key, one tensor
        elif isinstance(host, TrainableCopies) and name in host.copies:
            for key, tensor in host.copies[name].state_dict(keep_vars=True).items():
                tensors[f"{path}.{key}"] = tensor
    bias_mode = getattr(model.configs[name], "bias", "none")
    if bias_mode != "none":
        params = dict(model.model.named_parameters())
        hosted = {path for path, host in model.hosts() if isinstance(host, DeltaLayer)}
        for bias_path in bias_parameter_paths(model, {bias_mode}):
            module_path = bias_path[: -len(".bias")]
            key = f"{module_path}.base_layer.bias" if module_path in hosted else bias_path
            tensors[key] = params[bias_path]
    return tensors


def infer_task_type(model: nn.Module) -> str | None:
    class_name = type(model).__name__
    return next((task for suffix, task in TASK_TYPES.items() if class_name.endswith(suffix)), None)


def config_dict(model: DeltaModel, name: str) -> dict[str, Any]:
    config = model.configs[name]
    data = config.to_peft_dict()
    if config.task_type is None:
        task = infer_task_type(model.model)
        saves_head = any(isinstance(h, TrainableCopies) and name in h.copies for _, h in model.hosts())
        # PEFT wraps the head of SEQ_CLS/TOKEN_CLS/QA models itself and then expects its tensors in the file
        data["task_type"] = task if task in ("CAUSAL_LM", "SEQ_2_SEQ_LM") or saves_head else None
    if "fan_in_fan_out" in data and getattr(config, "fan_in_fan_out", None) is None:
        data["fan_in_fan_out"] = any(
            getattr(host.adapters[name], "fan_in_fan_out", False)
            for _, host in model.hosts()
            if isinstance(host, DeltaLayer) and name in host.adapters
        )
    data["inference_mode"] = True
    return dict(sorted(data.items()))


# ---- saving ------------------------------------------------------------------------------------------------------
def save_adapter(model: DeltaModel, directory: str | os.PathLike, name: str) -> None:
    """Write one adapter to ``directory``; both files are fully written before either replaces an old one."""
    from safetensors.torch import save_file

    if name not in model.configs:
        raise ConfigError(f"no adapter named '{name}'; adapters: {', '.join(model.configs)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw, data = adapter_tensors(model, name), config_dict(model, name)
    data, raw = model.configs[name].export_for_save(model, name, data, raw)  # e.g. PiSSA -> plain LoRA, as PEFT converts
    tensors = {file_key(model.configs[name], k): v.detach().to("cpu").clone().contiguous() for k, v in raw.items()}
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    metadata = {"format": "pt", "written_by": "deltatune"}
    weights_tmp = _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=metadata))
    try:
        config_tmp = _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text, encoding="utf-8"))
    except BaseException:
        weights_tmp.unlink()
        raise
    os.replace(weights_tmp, directory / WEIGHTS_NAME)
    os.replace(config_tmp, directory / CONFIG_NAME)


def save(model: DeltaModel, directory: str | os.PathLike, adapter: str | None = None) -> None:
    """Save ``adapter`` into ``directory``; with no adapter, all of them ("default", or a lone adapter, at the
    top, every other one in ``directory/<name>/`` as PEFT does)."""
    if adapter is not None:
        save_adapter(model, directory, adapter)
        return
    names = list(model.configs)
    for name in names:
        top = name == "default" or len(names) == 1
        save_adapter(model, directory if top else Path(directory) / name, name)


# ---- loading -----------------------------------------------------------------------------------------------------
def read_config(directory: Path) -> DeltaConfig:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterFileError(f"no {CONFIG_NAME} in {directory}; point at a folder written by model.save() or PEFT")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterFileError(f"{path} is {path.stat().st_size:,} bytes, not an adapter config (those are < 1 MB)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise AdapterFileError(f"{path} is not valid JSON ({reason}); the file is corrupt, save the adapter again") from error
    try:
        return config_from_peft_dict(data)
    except DeltatuneError:
        raise
    except Exception as error:  # a value of the wrong type deep inside the config
        raise ConfigError(f"{path} holds an invalid adapter config: {error}") from error


def file_key(config: DeltaConfig, key: str) -> str:
    """The file key of an adapter tensor: ``<prefix><key>`` (PEFT: ``base_model.model.`` for layer methods,
    ``base_model.`` for prompt methods), except keys PEFT stores at the top level (``prompt_embeddings``)."""
    if key in config.file_root_keys:
        return key
    return config.file_prefix + key


def read_tensors(directory: Path, allow_bin: bool = False, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if path.is_file():
        from safetensors.torch import load_file

        try:  # pread: tensors in memory of their own; the default mmap backend would tie them to the file, which a
            # later write to it changes and a truncation turns into a crash (SIGBUS), and loading keeps them as they are
            tensors = load_file(str(path), backend="pread")
        except BaseException as error:  # safetensors raises SafetensorError, or a Rust PanicException
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            raise AdapterFileError(f"{path} is not a readable safetensors file ({error}); save the adapter again") from error
    elif (directory / LEGACY_WEIGHTS_NAME).is_file():
        legacy = directory / LEGACY_WEIGHTS_NAME
        if not allow_bin:
            raise AdapterFileError(
                f"{directory} only has the legacy pickle file {LEGACY_WEIGHTS_NAME}; loading pickles can run code. "
                f"If you trust it, pass allow_bin=True (it is read with weights_only=True)"
            )
        try:
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as error:
            raise AdapterFileError(f"{legacy} could not be read ({error})") from error
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise AdapterFileError(f"{legacy} does not hold a dict of tensors")
    else:
        raise AdapterFileError(f"no {WEIGHTS_NAME} in {directory}; point at a folder written by model.save() or PEFT")
    check_finite(tensors, directory)
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in tensors.items()}


def _check_fit(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], directory: Path) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    problems: list[str] = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    for key in sorted(set(expected) & set(tensors)):
        if tuple(expected[key].shape) != tuple(tensors[key].shape):
            problems.append(
                f"shape mismatch for {key}: file {tuple(tensors[key].shape)}, model {tuple(expected[key].shape)}"
            )
            break
        if not tensors[key].is_floating_point():
            problems.append(f"{key} has dtype {tensors[key].dtype}; adapter tensors must be floating point")
            break
    if problems:
        raise AdapterFileError(
            f"adapter in {directory} does not fit this model: {'; '.join(problems)}. "
            f"Was it trained on another base model or with other targets?"
        )


def check_finite(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """Refuse NaN/inf in any tensor of the file (a diverged run or a corrupt file), naming the first one."""
    for key in sorted(tensors):
        tensor = tensors[key]
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFileError(
                f"tensor {key} in {directory} holds NaN/inf values; the adapter is corrupt or its training diverged: "
                f"retrain it (e.g. with a lower learning rate) or load an earlier checkpoint"
            )


def _check_sizes(config: DeltaConfig, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """Before anything is allocated: every size the config asks for (rank, virtual tokens, bottleneck) must appear
    as a dimension of some tensor in the file, so a config cannot make the loader allocate more than the file holds."""
    largest = max((max(t.shape, default=1) for t in tensors.values()), default=0)
    for name in SIZE_FIELDS:
        if name == "r" and not getattr(config, "rank_is_tensor_dim", True):  # see LayerDeltaConfig
            continue
        value = getattr(config, name, None)
        values = [value, *(getattr(config, "rank_pattern", None) or {}).values()] if name == "r" else [value]
        for size in values:
            if isinstance(size, int) and not isinstance(size, bool) and size > largest:
                raise AdapterFileError(
                    f"{directory / CONFIG_NAME} asks for {name} = {size}, but no tensor in "
                    f"{directory / WEIGHTS_NAME} has a dimension that large (largest: {largest}); the config does not "
                    f"belong to these weights: save the adapter again"
                )


def load(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str = "default",
    allow_bin: bool = False,
    activate: bool | None = None,
) -> DeltaModel:
    """Load an adapter folder (deltatune or HF PEFT) onto ``model`` (a plain model or a ``DeltaModel``).

    Returns the ``DeltaModel``. On any error the model is left exactly as it was. ``activate`` defaults to True
    when this is the model's first adapter.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"adapter folder {directory} does not exist")
    config = read_config(directory)
    tensors = read_tensors(directory, allow_bin=allow_bin, prefix=config.file_prefix)
    _check_sizes(config, tensors, directory)
    if getattr(config, "init", None) in PRINCIPAL_INITS:  # an unconverted PiSSA/OLoRA file: see lora_init
        if config.method != "lora":
            raise AdapterFileError(f"{directory}: init {config.init!r} is supported for plain LoRA files only")
        root = model.model if isinstance(model, DeltaModel) else model
        config, tensors = principal_file_as_plain_lora(root, config, tensors)
    fresh = not isinstance(model, DeltaModel)
    flags = [(p, p.requires_grad) for p in model.parameters()]  # the user's flags, put back exactly on failure
    if fresh:  # built empty (init=False): the file's tensors become the adapter's, no initialisation runs first
        delta_model = DeltaModel(model, config, name, init=False)
    else:
        delta_model = model
        delta_model.add_adapter(name, config, init=False)
    restore: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    try:
        expected = adapter_tensors(delta_model, name)
        overrides = _base_overrides(delta_model, tensors, expected)
        expected.update(overrides)
        _check_fit(expected, tensors, directory)
        _warn_base_overrides(expected, tensors, overrides)
        _fill_adapter(delta_model, name, expected, tensors, restore)
    except BaseException:
        with torch.no_grad():
            for key, old in restore.items():
                expected[key].copy_(old)
        if fresh:  # keep=[]: every host gives back its original module (never a modules_to_save copy)
            delta_model.unload(keep=[])
            delta_model.restore_requires_grad()
        else:
            delta_model.delete_adapter(name)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        raise
    if activate or (activate is None and fresh):
        delta_model.set_adapter(name)
    return delta_model


def _base_overrides(
    model: DeltaModel, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Base weights of adapted embeddings that a file may carry (PEFT's ``save_embedding_layers`` writes
    ``<path>.base_layer.weight`` for targeted embeddings, e.g. after resizing the vocabulary); they are loaded into
    the base, optional. Such keys for any other layer stay unexpected, so the file is refused."""
    hosts = dict(model.hosts())
    found: dict[str, torch.Tensor] = {}
    for key in tensors:
        path, marker, param_name = key.rpartition(".base_layer.")
        host = hosts.get(path)
        if (
            marker and key not in expected and isinstance(host, DeltaLayer) and param_name in host._parameters
            and layer_kind(host) == "embedding"
        ):
            found[key] = host._parameters[param_name]
    return found


def _warn_base_overrides(
    expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], overrides: dict[str, torch.Tensor]
) -> None:
    """Say so when a file's base-layer weights replace different values in the frozen base."""
    changed = sorted(k for k in overrides if not torch.equal(expected[k].detach().cpu(), tensors[k].to(expected[k].dtype)))
    if changed:
        warnings.warn(
            f"the adapter file replaces frozen base weights {', '.join(changed[:3])}"
            f"{' ...' if len(changed) > 3 else ''} (PEFT save_embedding_layers); the base model is changed while "
            f"the adapter is loaded. Load it into a fresh copy of the base if others share this model",
            stacklevel=3,
        )


def _fill_adapter(
    model: DeltaModel, name: str, expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
    restore: dict[str, torch.Tensor],
) -> None:
    """Put the file's tensors into adapter ``name``, built empty (``add_adapter(init=False)``).

    Its own tensors, on the meta device, take the file's tensors themselves (``filling.fill``: no copy when device
    and dtype already match). Real targets are base tensors a file may carry (``bias="all"`` / ``"lora_only"``,
    embedding base weights): they are copied into, their old values kept in ``restore`` for a roll-back. An adapter
    tensor left on the meta device (computed by no one) is an error naming it, never garbage in the model.
    """
    with torch.no_grad():
        for key, target in expected.items():
            if not target.is_meta:
                restore[key] = target.detach().clone()
                target.copy_(tensors[key])
    holders = [(path, host.adapter_module(name)) for path, host in model.hosts()]
    holders = [(path, module) for path, module in holders if module is not None]
    fill([module for _, module in holders], {id(t): tensors[k] for k, t in expected.items() if t.is_meta})
    left = unfilled(holders)
    if left:
        raise DeltatuneError(
            f"adapter '{name}' has tensors that neither its file nor its method filled: {', '.join(left[:3])}"
            f"{' ...' if len(left) > 3 else ''} are still on the meta device. The method builds them as file tensors "
            f"but no file holds them: compute them on a real device when built (see deltatune.protocol.no_init)"
        )


register_strategy("save", save)
register_strategy("load", load)
