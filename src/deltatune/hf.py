"""Hugging Face ecosystem glue: ``transformers.Trainer`` / ``accelerate`` training of a ``DeltaModel`` whose
checkpoints hold adapter files (PEFT layout), and the input-gradient hook that gradient checkpointing needs.

```python
from deltatune.hf import DeltaTrainer
trainer = DeltaTrainer(model=dt.wrap(base, dt.LoraConfig(r=8)), args=TrainingArguments(...), ...)
trainer.train()                   # checkpoint-*/adapter_config.json + adapter_model.safetensors, no model.safetensors
trainer.train(resume_from_checkpoint=True)   # adapter tensors, optimizer, scheduler and RNG come back
```
Under ``torchrun`` / ``accelerate launch`` the Trainer wraps the model in DDP itself; only adapter tensors require
grad, so only they are all-reduced, and rank 0 writes the files. Accelerate's FSDP plugin is refused (its state-dict
path would hand ``_save`` sharded tensors); shard with ``deltatune train --shard`` (FSDP2) instead.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .io import PREFIX, _check_fit, adapter_tensors, read_tensors
from .model import DeltaModel

try:
    from transformers import Trainer
    from transformers.utils import can_return_loss, find_labels
except ImportError as error:  # pragma: no cover - transformers is an optional extra
    raise ImportError("deltatune.hf needs transformers: pip install 'deltatune[hf]'") from error


def input_embeddings(model: nn.Module) -> nn.Module:
    """The module whose output is the network's first hidden state: ``get_input_embeddings()`` of a transformers
    model (also under a ``DeltaModel``), else the first ``nn.Embedding``."""
    base = model.model if isinstance(model, DeltaModel) else model
    getter = getattr(base, "get_input_embeddings", None)
    if getter is not None:
        try:
            found = getter()
        except NotImplementedError:
            found = None
        if found is not None:
            return found
    for module in base.modules():
        if isinstance(module, nn.Embedding):
            return module
    raise ConfigError("could not find the model's input embeddings (no get_input_embeddings() and no nn.Embedding)")


def enable_input_require_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad, so that re-entrant gradient checkpointing
    (``torch.utils.checkpoint(..., use_reentrant=True)``) of blocks behind a *frozen* embedding still
    backpropagates into the adapters inside them. Without it the checkpointed block's output does not require
    grad: its adapters silently get no gradient, or the loss "does not require grad" (PEFT issue #137).
    Idempotent; costs nothing but the embedding output's autograd node."""
    embeddings = input_embeddings(model)
    if getattr(embeddings, "_deltatune_input_grads", None) is not None:
        return

    def require_grad(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            output.requires_grad_(True)

    embeddings._deltatune_input_grads = embeddings.register_forward_hook(require_grad)


def disable_input_require_grads(model: nn.Module) -> None:
    embeddings = input_embeddings(model)
    handle = getattr(embeddings, "_deltatune_input_grads", None)
    if handle is not None:
        handle.remove()
        embeddings._deltatune_input_grads = None


def adapter_folder(directory: Path, name: str, names: list[str]) -> Path:
    """Where ``DeltaModel.save(directory)`` puts adapter ``name``: the top for "default" or a lone adapter."""
    return directory if name == "default" or len(names) == 1 else directory / name


def load_adapter_weights(model: DeltaModel, directory: str | os.PathLike) -> None:
    """Copy the tensors that ``model.save(directory)`` wrote back into the model's existing adapters (every tensor
    checked first: on a mismatch nothing is changed)."""
    directory, names = Path(directory), list(model.configs)
    plans = []
    for name in names:
        folder = adapter_folder(directory, name, names)
        config = model.configs[name]
        tensors = read_tensors(folder, prefix=getattr(config, "file_prefix", PREFIX))
        expected = adapter_tensors(model, name)
        _check_fit(expected, tensors, folder)
        plans.append((expected, tensors))
    with torch.no_grad():
        for expected, tensors in plans:
            for key, target in expected.items():
                target.copy_(tensors[key])


def base_accepts_loss_kwargs(model: DeltaModel) -> bool:
    """What ``transformers.Trainer`` would decide for the bare base model (``num_items_in_batch`` passing)."""
    base = model.model
    if hasattr(base, "accepts_loss_kwargs"):
        return bool(base.accepts_loss_kwargs)
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(base.forward).parameters.values())


class DeltaTrainer(Trainer):
    """``transformers.Trainer`` for a ``DeltaModel``: checkpoints and ``save_model`` write the adapters (PEFT
    layout, every adapter) instead of the full model; resuming and ``load_best_model_at_end`` read them back;
    column filtering and loss-kwargs handling follow the base model's ``forward``; with
    ``gradient_checkpointing=True`` the input embeddings' output requires grad (see ``enable_input_require_grads``).
    """

    def __init__(self, model: DeltaModel | None = None, *args: Any, **kwargs: Any) -> None:
        if not isinstance(model, DeltaModel):
            raise ConfigError(
                f"DeltaTrainer trains a DeltaModel (dt.wrap(base, config)), got {type(model).__name__}; "
                f"use transformers.Trainer for other models"
            )
        super().__init__(model, *args, **kwargs)
        if self.is_fsdp_enabled:
            raise ConfigError(
                "DeltaTrainer does not support accelerate's FSDP plugin (adapter files would be written from sharded "
                "tensors); use DDP (the default under torchrun / accelerate launch) or deltatune train --shard"
            )
        self.model_accepts_loss_kwargs = base_accepts_loss_kwargs(model)
        # Trainer reads label names off the model class's forward, which for DeltaModel is (*args, **kwargs)
        if self.args.label_names is None:
            self.label_names = find_labels(type(model.model))
        self.can_return_loss = can_return_loss(type(model.model))
        if self.args.gradient_checkpointing:
            enable_input_require_grads(model)

    @property
    def delta_model(self) -> DeltaModel:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        assert isinstance(model, DeltaModel)
        return model

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            signature = inspect.signature(self.delta_model.model.forward)
            self._signature_columns = [*signature.parameters, *sorted({"label", "label_ids", *self.label_names})]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapters (+ tokenizer/processor and the training arguments) on the saving process."""
        from transformers.trainer import TRAINING_ARGS_NAME

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.delta_model.save(output_dir)
        processor = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_adapter_weights(self.delta_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapter_weights(self.delta_model, self.state.best_model_checkpoint)


__all__ = ["DeltaTrainer", "disable_input_require_grads", "enable_input_require_grads", "load_adapter_weights"]
