"""The one-process training strategy: the interface of ``distributed.Distributed`` (the trainer's and
``run_training``'s only view of how many processes train) where every collective is the identity."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifacts import restore_trainable, save_trained, trainable_state
from .batching import Encoded


class SingleProcess:
    """One process on the CPU: all rows are its own, sums and broadcasts return their input, nothing is sharded."""

    rank, world_size, is_main, shard = 0, 1, True, False
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.forward_model: nn.Module | None = None

    def __repr__(self) -> str:
        return "SingleProcess()"

    def barrier(self) -> None:
        pass

    def record(self) -> dict[str, Any] | None:
        """What ``run.json`` records about the processes: nothing for one."""
        return None

    # ---- model -------------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` unchanged: it is the module the trainer calls."""
        self.forward_model = model
        return model

    @property
    def eval_model(self) -> nn.Module:
        return self.forward_model

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    # ---- batches and reductions --------------------------------------------------------------------------------
    def local_rows(self, data: Encoded, indices: list[int], task: str) -> tuple[list[int], float]:
        return indices, 1.0

    def loss_value(self, loss: torch.Tensor, weight: float) -> torch.Tensor:
        """The micro-batch's loss for the log (detached)."""
        return loss.detach()

    def all_sum(self, values: list[float]) -> list[float]:
        return [float(v) for v in values]

    def from_main(self, value: Any) -> Any:
        return value

    # ---- state -------------------------------------------------------------------------------------------------
    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return trainable_state(model)

    def restore_trainable(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        restore_trainable(model, state)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, trainable: dict[str, torch.Tensor],
                saved: dict[str, Any], check: Callable[[dict[str, Any]], None]) -> None:
        """A checkpoint's optimizer state (after ``check(saved)``, which refuses other parameter groups before
        anything changed), then its trainable tensors."""
        check(saved)
        optimizer.load_state_dict(saved)
        restore_trainable(model, trainable)

    @contextlib.contextmanager
    def gathered(self, model: nn.Module) -> Iterator[None]:
        yield

    def save_trained(self, model: nn.Module, directory: Path, method: str, info: dict[str, Any]) -> None:
        save_trained(model, directory, method, info)
