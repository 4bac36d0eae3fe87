"""What a run leaves behind and how it is read back.

- adapter methods: the PEFT-layout adapter (``adapter_config.json`` + ``adapter_model.safetensors``, see ``io``);
- stacked methods (``lora+prefix``): one PEFT-layout folder per part (``lora/``, ``prefix/``; each loads on its own
  with ``dt.load``) plus ``stack.json`` naming the parts in order (and task, labels, base model);
- baselines: ``baseline.json`` + ``baseline.safetensors`` holding the trained tensors under the base model's own
  state-dict keys (all of them for ``full``);
- ``checkpoint.pt``: trainable tensors, optimizer, scheduler, RNG and data position for ``--resume``; written to a
  temp file and renamed, so a crash mid-write keeps the previous checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterFileError
from ..io import CONFIG_NAME, WEIGHTS_NAME, atomic_write, check_finite
from ..io import load as load_adapter
from ..model import DeltaModel

STACK_CONFIG = "stack.json"
BASELINE_CONFIG = "baseline.json"
BASELINE_WEIGHTS = "baseline.safetensors"
CHECKPOINT = "checkpoint.pt"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable tensors, keyed by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


# ---- final artifacts ---------------------------------------------------------------------------------------------
def save_trained(model: nn.Module, directory: Path, method: str, info: dict[str, Any]) -> None:
    """Write the trained weights of a run: the adapter (PEFT layout), a stack's adapters (one folder each, then
    ``stack.json``) or the baseline's trained tensors."""
    if isinstance(model, DeltaModel):
        names = list(model.configs)
        if names == ["default"]:
            model.save(str(directory))
            (directory / STACK_CONFIG).unlink(missing_ok=True)
            return
        for name in names:
            model.save(str(directory / name), adapter=name)
        _write_json(directory / STACK_CONFIG, {"method": method, "adapters": names, **info})
        return
    from safetensors.torch import save_file

    tensors = {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}
    atomic_write(directory / BASELINE_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _write_json(directory / BASELINE_CONFIG, {"method": method, **info, "tensors": len(tensors)})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def read_stack(directory: Path) -> dict[str, Any]:
    """``stack.json``: ``adapters`` (part folders in activation order), ``method``, ``task``, ``labels``,
    ``base_model`` (absent in a merged folder, whose base model is the folder itself)."""
    path = directory / STACK_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterFileError(f"{path} could not be read ({error}); train or merge the run again") from error
    names = data.get("adapters") if isinstance(data, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise AdapterFileError(f"{path} has no 'adapters' list naming the adapter folders")
    missing = [n for n in names if not (directory / n / CONFIG_NAME).is_file()]
    if missing:
        raise AdapterFileError(f"{directory} lacks the adapter folders {missing} that {STACK_CONFIG} lists")
    return data


def artifact_kind(directory: Path) -> str:
    if (directory / STACK_CONFIG).is_file():
        return "stack"
    if (directory / CONFIG_NAME).is_file():
        return "adapter"
    if (directory / BASELINE_CONFIG).is_file():
        return "baseline"
    raise AdapterFileError(
        f"{directory} holds neither an adapter ({CONFIG_NAME}), a stack of adapters ({STACK_CONFIG}) nor baseline "
        f"weights ({BASELINE_CONFIG}); point at a run folder written by 'deltatune train' or an adapter folder"
    )


def artifact_files(directory: Path) -> list[Path]:
    kind = artifact_kind(directory)
    if kind == "stack":
        parts = [directory / n / f for n in read_stack(directory)["adapters"] for f in (CONFIG_NAME, WEIGHTS_NAME)]
        return [directory / STACK_CONFIG, *(p for p in parts if p.is_file())]
    names = (CONFIG_NAME, WEIGHTS_NAME) if kind == "adapter" else (BASELINE_CONFIG, BASELINE_WEIGHTS)
    return [directory / n for n in names if (directory / n).is_file()]


def artifact_size(directory: Path) -> int:
    """Bytes on disk of the trained weights (+ their config files)."""
    return sum(p.stat().st_size for p in artifact_files(directory))


def load_stack(model: nn.Module, directory: Path) -> DeltaModel:
    """Load every part of a stack folder (each its own adapter, named after its folder) and activate them all in
    the recorded order; on error the model is left as it was."""
    names = read_stack(directory)["adapters"]
    loaded: DeltaModel | None = None
    try:
        for name in names:
            loaded = load_adapter(loaded if loaded is not None else model, str(directory / name), name=name)
    except BaseException:
        if loaded is not None:
            loaded.unload(keep=[])
            loaded.restore_requires_grad()
        raise
    assert loaded is not None
    loaded.set_adapter(names)
    return loaded


def load_trained(model: nn.Module, directory: Path) -> nn.Module:
    """Apply a run's weights to a freshly loaded base model: an adapter (or a stack of them) gives a
    ``DeltaModel``, a baseline overwrites the base's tensors in place (every key must exist with the same shape)."""
    kind = artifact_kind(directory)
    if kind == "stack":
        return load_stack(model, directory)
    if kind == "adapter":
        return load_adapter(model, str(directory))
    from safetensors.torch import load_file

    path = directory / BASELINE_WEIGHTS
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing; the run did not finish writing its weights")
    try:
        tensors = load_file(str(path))
    except BaseException as error:  # safetensors' SafetensorError, or a Rust PanicException, on a corrupt file
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        raise AdapterFileError(f"{path} is not a readable safetensors file ({error}); train the run again") from error
    check_finite(tensors, directory)
    own = model.state_dict()
    bad = [k for k, v in tensors.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise AdapterFileError(
            f"weights in {directory} do not fit this model ({len(bad)} tensors missing or of another shape, e.g. "
            f"{bad[0]}); was it trained on another base model?"
        )
    model.load_state_dict(tensors, strict=False)
    return model


# ---- checkpoints -------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise AdapterFileError(f"checkpoint {path} could not be read ({error}); delete it to start over") from error
