"""Training with several processes (``torchrun`` / ``accelerate launch`` / ``deltatune train --nproc N``).

- The process group is created from the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``): NCCL when
  CUDA is available (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU.
- DDP (default) synchronises only the trainable parameters: frozen base tensors and buffers are neither broadcast
  at start nor all-reduced. FSDP2 (``shard=True``) applies ``torch.distributed.fsdp.fully_shard`` to every
  transformer block (the model's ``_no_split_modules``) and then to the root, so each process holds ``1/N`` of the
  frozen base. Adapter hosts share the base module's ``_parameters`` dict, so FSDP's parameter swaps reach the base.
- ``--batch-size`` stays the global batch: every process builds the same batches and takes rows ``rank::N`` of each.
  With ``n_r`` loss units on rank ``r`` (rows for classification, target tokens for causal LM) and ``n`` in the
  whole micro-batch, rank ``r`` backpropagates ``N * (n_r / n) * loss_r``; DDP/FSDP average over ranks, so the
  gradient is exactly that of the global micro-batch mean (a rank with no rows runs one row with weight 0).
- Checkpoints and adapter files hold full (gathered) tensors under the single-process names, written by rank 0
  only (atomic writes), so a run resumes with any number of processes, including one.
- ``setup`` gives a ``Distributed`` under a launcher and a ``single.SingleProcess`` (the same interface, every
  collective the identity) otherwise: the trainer and ``run_training`` never ask how many processes there are.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from ..model import DeltaModel
from .batching import IGNORE, Encoded
from .single import SingleProcess


def launched() -> bool:
    """Whether this process was started by a multi-process launcher (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for a sharded DTensor; collective: every rank must call it)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def loss_units(data: Encoded, rows: list[int], task: str) -> int:
    """What the model's mean loss averages over: rows (classification) or next-token targets (causal LM)."""
    if task == "classification":
        return len(rows)
    return sum(sum(1 for label in data.labels[i][1:] if label != IGNORE) for i in rows)


class InputsOn(nn.Module):
    """Calls ``module`` with every tensor argument moved to ``device`` and gives ``logits`` back on the CPU, where
    ``tasks.evaluate`` keeps the labels (evaluation on a GPU process)."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.module, self.device = module, device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        move = lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        output = self.module(*[move(a) for a in args], **{k: move(v) for k, v in kwargs.items()})
        if isinstance(getattr(output, "logits", None), torch.Tensor):
            output["logits"] = output["logits"].cpu()
        return output


class Distributed:
    """One process of a multi-process run: its rank, device, the wrapped model, and the collectives the trainer needs."""

    def __init__(self, shard: bool = False) -> None:
        self.owns_group = not dist.is_initialized()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and self.local_rank < torch.cuda.device_count()
        self.device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        if self.owns_group:  # kept for the life of the process: re-creating a group under torchrun fails
            if cuda:
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if cuda else "gloo", device_id=self.device if cuda else None)
            atexit.register(_destroy_group)
        self.backend = dist.get_backend()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.shard = shard
        self.forward_model: nn.Module | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        mode = "FSDP2" if self.shard else "DDP"
        return f"Distributed(rank {self.rank}/{self.world_size}, {self.backend}, {self.device}, {mode})"

    def barrier(self) -> None:
        dist.barrier()

    def record(self) -> dict[str, Any] | None:
        """What ``run.json`` records about the processes."""
        return {"world_size": self.world_size, "backend": self.backend, "shard": self.shard}

    # ---- model -------------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to this process's device, make every rank's trainable tensors equal to rank 0's, and
        wrap it (DDP) or shard it in place (FSDP2). Returns the module to call for training forwards; the trainer
        keeps ``model`` itself for names, state and saving. Build the optimizer after this."""
        model.to(self.device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("the model has no trainable parameters for this method")
        if self.shard:
            with torch.no_grad():
                for parameter in trainable:
                    dist.broadcast(parameter.data, src=0)
            self.forward_model = self._fully_shard(model)
        else:
            self.forward_model = self._ddp(model)
        return self.forward_model

    def _ddp(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        frozen = [n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad]
        buffers = [n for n, _ in model.named_buffers(remove_duplicate=False)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen + buffers)
        device_ids = [self.local_rank] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)  # buffers are ignored too: nothing to sync

    def _fully_shard(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for module in shard_units(model):
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    @property
    def eval_model(self) -> nn.Module:
        """The module to evaluate with (every rank evaluates the whole split; FSDP needs all ranks in each forward)."""
        model = self.forward_model.module if hasattr(self.forward_model, "no_sync") else self.forward_model
        return model if self.device.type == "cpu" else InputsOn(model, self.device)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch if self.device.type == "cpu" else {k: v.to(self.device) for k, v in batch.items()}

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP: skip the all-reduce on all but the last micro-batch of an accumulation group."""
        if not last and hasattr(self.forward_model, "no_sync"):
            return self.forward_model.no_sync()
        return contextlib.nullcontext()

    # ---- batches and reductions --------------------------------------------------------------------------------
    def local_rows(self, data: Encoded, indices: list[int], task: str) -> tuple[list[int], float]:
        """This rank's rows of a global micro-batch and its loss weight ``N * n_r / n`` (see the module doc)."""
        rows = indices[self.rank :: self.world_size]
        total = loss_units(data, indices, task)
        if not rows or total == 0:
            return indices[:1], 0.0
        return rows, self.world_size * loss_units(data, rows, task) / total

    def loss_value(self, loss: torch.Tensor, weight: float) -> torch.Tensor:
        """The global micro-batch's loss for the log: the ranks' weighted losses summed (collective)."""
        return torch.tensor(self.all_sum([float(loss.detach() * weight / self.world_size)])[0])

    def all_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (so decisions such as 'best so far' agree everywhere)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ---- state -------------------------------------------------------------------------------------------------
    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full CPU copies of the trainable tensors under their single-process names (collective)."""
        reshard(model)
        return {
            name: full_tensor(p.detach()).cpu().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    def restore_trainable(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Copy full tensors (from ``trainable_state`` or a checkpoint of any world size) into the model."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(like(params[name], tensor))

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` with sharded state gathered, i.e. exactly what one process would hold."""
        state = optimizer.state_dict()
        gathered = {}
        for pid in sorted(state["state"]):
            values = state["state"][pid]
            gathered[pid] = {k: full_tensor(values[k]).cpu() if torch.is_tensor(values[k]) else values[k] for k in sorted(values)}
        return {"state": gathered, "param_groups": state["param_groups"]}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a full optimizer state (any world size); per-parameter tensors are re-sharded like their parameter."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        ids = [pid for group in state["param_groups"] for pid in group["params"]]
        for pid, parameter in zip(ids, params):
            for key, value in state["state"].get(pid, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) == tuple(parameter.shape):
                    state["state"][pid][key] = like(parameter, value)
        optimizer.load_state_dict(state)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, trainable: dict[str, torch.Tensor],
                saved: dict[str, Any], check: Callable[[dict[str, Any]], None]) -> None:
        """A checkpoint's trainable tensors, then its optimizer state (any world size). ``check`` (the one-process
        parameter-group check) is not applied here: a mismatch fails in ``optimizer.load_state_dict``."""
        self.restore_trainable(model, trainable)
        self.load_optimizer_state(optimizer, saved)

    @contextlib.contextmanager
    def gathered(self, model: nn.Module) -> Iterator[None]:
        """Inside the block the tensors that get saved (adapter tensors; a baseline's trainable parameters) are
        whole, on every rank; only they are gathered, never the frozen base. Restored to the shards on exit."""
        if not self.shard:
            yield
            return
        reshard(model)
        wanted = {id(t) for t in saved_tensors(model)}
        swaps: list[tuple[dict, str, nn.Parameter]] = []
        full: dict[int, nn.Parameter] = {}
        seen: set[int] = set()
        try:
            for module in model.modules():
                table = module._parameters
                if id(table) in seen:  # a host shares its base's dict
                    continue
                seen.add(id(table))
                for key, parameter in list(table.items()):
                    if parameter is None or id(parameter) not in wanted or not is_dtensor(parameter):
                        continue
                    if id(parameter) not in full:
                        full[id(parameter)] = nn.Parameter(parameter.detach().full_tensor(), parameter.requires_grad)
                    swaps.append((table, key, parameter))
                    table[key] = full[id(parameter)]
            yield
        finally:
            for table, key, parameter in reversed(swaps):
                table[key] = parameter

    def save_trained(self, model: nn.Module, directory: Path, method: str, info: dict[str, Any]) -> None:
        """Gather the adapter (or a baseline's trained tensors) and write it from rank 0; every rank returns after
        the files exist."""
        from .artifacts import save_trained

        with self.gathered(model):
            if self.is_main:
                save_trained(model, directory, method, info)
        self.barrier()


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of ``model`` in its sharded state. FSDP leaves the root group unsharded after a
    forward without backward (evaluation), and its state-dict hooks reshard lazily; resharding first makes the
    registered parameters the same kind (DTensor shards) on every rank before anything is gathered."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def like(parameter: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (full) placed like ``parameter``: on its device, and sharded the same way when it is a DTensor
    (each rank takes its own chunk; no communication)."""
    tensor = tensor.to(device=parameter.device, dtype=parameter.dtype)
    if is_dtensor(parameter):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(tensor, parameter.device_mesh, parameter.placements, src_data_rank=None)
    return tensor


def saved_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The parameters a run's artifact is computed from: every adapter's (including frozen ones, and encoders
    whose output a prompt/prefix file stores) plus whatever trains (biases, a baseline's tensors)."""
    tensors = [p for p in model.parameters() if p.requires_grad]
    if isinstance(model, DeltaModel):
        from ..layers import TrainableCopies

        for _, host in model.hosts():
            tensors += list((host.copies if isinstance(host, TrainableCopies) else host.adapters).parameters())
    return tensors


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 shards separately: modules whose class is in the model's ``_no_split_modules``, except
    blocks sharing a parameter with a module outside them (tied embeddings, e.g. a masked-LM decoder) and a block
    holding the input embeddings when prompt-family adapters call them from outside that block's forward (such
    tensors stay in the root group, whole during the root's forward)."""
    from ..methods.virtual_tokens import VirtualTokenHost

    names: set[str] = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    hosts = [m for m in model.modules() if isinstance(m, VirtualTokenHost)]
    if hosts:
        from ..methods.virtual_tokens import input_embeddings

        embedding = input_embeddings(hosts[0].root)
        units = [u for u in units if not any(m is embedding for m in u.modules())]
    units = [u for u in units if self_contained(u, model)]
    return units[::-1]  # innermost first, as fully_shard requires


def self_contained(unit: nn.Module, model: nn.Module) -> bool:
    """Whether no parameter of ``unit`` is also registered on a module outside it."""
    inside_modules = {id(m) for m in unit.modules()}
    inside_params = {id(p) for p in unit.parameters()}
    for module in model.modules():
        if id(module) not in inside_modules and any(id(p) in inside_params for p in module._parameters.values() if p is not None):
            return False
    return True


def setup(shard: bool = False) -> Distributed | SingleProcess:
    """The process's ``Distributed`` when started by a multi-process launcher, else a ``SingleProcess`` (the same
    interface). The first call creates the process group (gloo / NCCL); later calls, and a group the caller
    created, reuse it."""
    if not launched():
        if shard:
            raise ConfigError("--shard needs several processes: add --nproc N, or launch with torchrun / accelerate launch")
        return SingleProcess()
    return Distributed(shard=shard)
