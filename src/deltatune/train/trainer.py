"""The training loop: any torch optimizer (AdamW default, LoRA+ groups), linear/cosine/constant schedules with
warmup, gradient accumulation, clipping, bf16 autocast, periodic evaluation keeping the best weights, atomic
resumable checkpoints (identical loss curve after ``--resume``), SIGINT -> checkpoint, NaN/inf -> clear stop.

A step is one optimizer update over ``grad_accum`` micro-batches, each micro-batch loss scaled by 1/len(group).
LR at step t (0-based): ``lr * t/w`` during warmup ``w``, then ``lr * f(p)`` with ``p = (t-w)/(T-w)``,
``f = 1-p`` (linear), ``(1+cos(pi p))/2`` (cosine) or 1 (constant).
"""

from __future__ import annotations

import inspect
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch import nn

from ..errors import ConfigError, DeltatuneError
from .artifacts import CHECKPOINT, load_checkpoint, save_checkpoint
from .batching import Encoded, collate, train_batches
from .lm_fast import loss_function
from .models import unwrap_hf
from .settings import RunSettings
from .single import SingleProcess
from .tasks import better, evaluate

if TYPE_CHECKING:
    from .distributed import Distributed


class TrainingError(DeltatuneError, RuntimeError):
    """Training cannot go on (non-finite loss)."""


class Interrupted(DeltatuneError):
    """Training stopped on request (Ctrl-C) after writing a checkpoint."""


def build_optimizer(
    model: nn.Module, settings: RunSettings, lr: float, head_params: Iterable[nn.Parameter] = ()
) -> torch.optim.Optimizer:
    """``settings.optimizer`` (any ``torch.optim`` class by case-insensitive name) over the trainable parameters.

    Groups: weight decay only on tensors with >= 2 dims (not biases or norms); with ``loraplus_ratio`` the groups
    of ``deltatune.optim.loraplus_groups`` (LoRA+, Hayou et al. 2024: ``lr_B = ratio * lr``). With
    ``settings.head_lr``, ``head_params`` move into groups of their own at that learning rate.
    """
    classes = {n.lower(): c for n, c in vars(torch.optim).items() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)}
    cls = classes.get(settings.optimizer.lower())
    if cls is None or cls is torch.optim.Optimizer:
        raise ConfigError(f"unknown optimizer {settings.optimizer!r}; torch.optim has {', '.join(sorted(classes))}")
    if settings.loraplus_ratio is not None:
        from ..optim import loraplus_groups

        groups = loraplus_groups(model, lr, settings.loraplus_ratio, weight_decay=settings.weight_decay)
        if not any(g["name"] == "lora_B" for g in groups):
            raise ConfigError("--loraplus-ratio needs a LoRA-family method (no LoRA B matrices are trained)")
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": settings.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("the model has no trainable parameters for this method")
    if settings.head_lr is not None:
        groups = split_head_groups(groups, head_params, settings.head_lr)
    if "weight_decay" not in inspect.signature(cls).parameters:
        groups = [{k: v for k, v in g.items() if k != "weight_decay"} for g in groups]
    try:
        return cls(groups, lr=lr, **settings.optimizer_args)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"optimizer {settings.optimizer} rejected its arguments: {error}") from error


def split_head_groups(groups: list[dict[str, Any]], head_params: Iterable[nn.Parameter], head_lr: float) -> list[dict[str, Any]]:
    """Each group's head parameters as a copy of that group (same weight decay) at ``lr = head_lr``."""
    head_ids = {id(p) for p in head_params}
    if not head_ids:
        raise ConfigError("--head-lr: this model has no trainable task head (nothing to give a learning rate)")
    split: list[dict[str, Any]] = []
    for group in groups:
        body = [p for p in group["params"] if id(p) not in head_ids]
        head = [p for p in group["params"] if id(p) in head_ids]
        if body:
            split.append({**group, "params": body})
        if head:
            split.append({**group, "params": head, "lr": head_lr, "name": f"{group.get('name', 'params')}_head"})
    return split


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    if step < warmup:
        return step / max(warmup, 1)
    if kind == "constant":
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer:
    """Trains ``model`` on ``train`` and evaluates on ``dev``; ``on_best(model)`` saves the best weights."""

    def __init__(
        self,
        model: nn.Module,
        settings: RunSettings,
        train: Encoded,
        dev: Encoded | None,
        run_dir: Path,
        task: str,
        pad_id: int,
        num_classes: int,
        lr: float,
        on_best: Callable[[nn.Module], None],
        on_step: Callable[[Trainer, dict[str, Any]], None] | None = None,
        dist: Distributed | SingleProcess | None = None,
        head_params: Iterable[nn.Parameter] = (),
    ) -> None:
        """``dist``: how many processes train (``distributed.setup``), ``model`` already passed through
        ``dist.prepare``; None: one process. ``head_params``: the task head's parameters (their own lr with
        ``settings.head_lr``)."""
        self.model, self.settings, self.train_data, self.dev = model, settings, train, dev
        if dist is None:
            dist = SingleProcess()
            dist.prepare(model)
        self.dist = dist  # every per-process difference goes through it (see single.py, distributed.py)
        self.forward_model = dist.forward_model
        self.is_main = dist.is_main
        self.run_dir, self.task, self.pad_id, self.num_classes = run_dir, task, pad_id, num_classes
        self.on_best, self.on_step = on_best, on_step
        self.metric = settings.metric or ("accuracy" if task == "classification" else "loss")
        self.batches_per_epoch = math.ceil(len(train) / settings.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / settings.grad_accum)
        self.total_steps = settings.max_steps or max(1, round(settings.epochs * self.steps_per_epoch))
        warmup = settings.warmup
        self.warmup_steps = int(warmup * self.total_steps) if warmup < 1 else int(warmup)
        self.fused_loss = loss_function(self.forward_model, unwrap_hf(model), task, settings.fused_ce, not isinstance(dist, SingleProcess))
        self.optimizer = build_optimizer(model, settings, lr, head_params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, self.warmup_steps, settings.scheduler)
        )
        self.step = 0
        self.position = (0, 0)  # (epoch, next step-group within the epoch)
        self.history: list[dict[str, Any]] = []
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None  # trainable tensors at the best evaluation
        self.train_time = 0.0
        self.tokens = 0
        self._stop = False
        self._saved_step: int | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def request_stop(self) -> None:
        """Finish the current step, write a checkpoint and raise ``Interrupted`` (what Ctrl-C does)."""
        self._stop = True

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "trainable": self.dist.trainable_state(self.model),
            "optimizer": self.dist.optimizer_state(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "step": self.step,
            "position": list(self.position),
            "history": json.dumps(self.history),
            "best": self.best,
            "best_step": self.best_step,
            "best_state": self.best_state or {},
            "train_time": self.train_time,
            "tokens": self.tokens,
        }

    def save_checkpoint(self) -> None:
        state = self.state()  # every rank: gathering sharded tensors is collective
        if self.is_main:
            save_checkpoint(self.checkpoint_path, state)

    def load_checkpoint(self) -> None:
        state = load_checkpoint(self.checkpoint_path)
        self.dist.restore(self.model, self.optimizer, state["trainable"], state["optimizer"], self._check_optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.step, self.position = state["step"], tuple(state["position"])
        self.history = json.loads(state["history"])
        self.best, self.best_step = state["best"], state["best_step"]
        self.best_state = state["best_state"] or None
        self.train_time, self.tokens = state["train_time"], state["tokens"]
        self._rewrite_metrics()

    def _check_optimizer(self, saved: dict[str, Any]) -> None:
        """Refuse the checkpoint's optimizer state when its parameter groups differ from this run's (another
        --head-lr, --loraplus-ratio or deltatune version), in one line naming the fix, before anything changed."""
        groups, built = saved.get("param_groups", []), self.optimizer.param_groups
        if len(groups) != len(built) or any(len(g["params"]) != len(b["params"]) for g, b in zip(groups, built)):
            lrs = ", ".join(f"{g.get('initial_lr', g.get('lr')):g}" for g in groups)
            raise ConfigError(
                f"{self.checkpoint_path} holds optimizer state for {len(groups)} parameter groups (learning rates {lrs}) "
                f"but this run builds {len(built)}: it was written with another --head-lr or --loraplus-ratio; resume "
                f"with the --head-lr it was started with, or pass --overwrite to start over"
            )

    # ---- metrics -----------------------------------------------------------------------------------------------
    def _rewrite_metrics(self) -> None:
        if not self.is_main:
            return
        lines = "".join(json.dumps(row) + "\n" for row in self.history)
        (self.run_dir / "metrics.jsonl").write_text(lines, encoding="utf-8")

    def _log(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if not self.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    # ---- one step ----------------------------------------------------------------------------------------------
    def _train_step(self, group: list[list[int]]) -> tuple[float, float | None, int]:
        """Forward/backward over the micro-batches of ``group`` and one optimizer update; (loss, grad norm, tokens)."""
        total, tokens = 0.0, 0
        for number, indices in enumerate(group):
            # this process's rows of the global micro-batch (see deltatune.train.distributed)
            indices, weight = self.dist.local_rows(self.train_data, indices, self.task)
            batch = collate(self.train_data, indices, self.pad_id, self.task)
            tokens += int(batch["attention_mask"].sum()) if weight else 0
            with self.dist.sync(number + 1 == len(group)):
                with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.settings.bf16):
                    if self.fused_loss is not None:
                        loss = self.fused_loss(batch)
                    else:
                        loss = self.forward_model(**self.dist.to_device(batch)).loss
                value = self.dist.loss_value(loss, weight)
                if not torch.isfinite(value):
                    self._stop_non_finite(value)
                (loss * weight / len(group)).backward()
            total += value.item() / len(group)
        tokens = int(self.dist.all_sum([tokens])[0])
        norm = None
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.settings.max_grad_norm:
            clipped = torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)
            norm = float(clipped.full_tensor() if hasattr(clipped, "full_tensor") else clipped)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, norm, tokens

    def _stop_non_finite(self, value: torch.Tensor) -> NoReturn:
        self.optimizer.zero_grad(set_to_none=True)
        kept = f"the last good checkpoint (step {self._saved_step}) is {self.checkpoint_path}" if self._saved_step is not None else "no checkpoint was written yet"
        raise TrainingError(
            f"loss became {value.item()} at step {self.step + 1}; training stopped and {kept}. "
            f"Lower --lr, set --max-grad-norm, or drop --bf16"
        )

    def _evaluate(self, epoch: float) -> dict[str, Any]:
        assert self.dev is not None
        result = evaluate(
            self.dist.eval_model, self.dev, self.task, self.pad_id, self.settings.eval_batch_size, self.num_classes,
            self.settings.bf16, fused=self.settings.fused_ce,
        )
        metrics = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        metrics = self.dist.from_main(metrics)  # identical decisions about the best weights on every rank
        self._log({"type": "eval", "split": "dev", "step": self.step, "epoch": round(epoch, 4), **metrics})
        if self.metric not in metrics:
            raise ConfigError(f"--metric {self.metric} is not computed for {self.task}; choose from {', '.join(metrics)}")
        if better(self.metric, metrics[self.metric], self.best):
            self.best, self.best_step = metrics[self.metric], self.step
            self.best_state = self.dist.trainable_state(self.model)
            self.on_best(self.model)
        return metrics

    # ---- the loop ----------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        if resume and self.checkpoint_path.is_file():
            self.load_checkpoint()
            self._saved_step = self.step
        elif self.is_main:
            (self.run_dir / "metrics.jsonl").write_text("", encoding="utf-8")
        previous = self._install_sigint()
        try:
            self._loop()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        return {"steps": self.step, "best": self.best, "best_step": self.best_step, "train_time": self.train_time, "tokens": self.tokens}

    def _install_sigint(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum: int, frame: Any) -> None:
            if self._stop:
                raise KeyboardInterrupt
            print("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to quit at once)", flush=True)
            self.request_stop()

        return signal.signal(signal.SIGINT, handler)

    def _loop(self) -> None:
        from tqdm.auto import tqdm

        settings = self.settings
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=settings.method, unit="step", disable=settings.quiet or not self.is_main,
                   dynamic_ncols=True, mininterval=1.0)
        epoch, start_group = self.position
        try:
            while self.step < self.total_steps:
                batches = train_batches(self.train_data, settings.batch_size, settings.seed, epoch, settings.group_by_length)
                groups = [batches[i : i + settings.grad_accum] for i in range(0, len(batches), settings.grad_accum)]
                for g in range(start_group, len(groups)):
                    if self.step >= self.total_steps:
                        break
                    lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
                    began = time.perf_counter()
                    loss, norm, tokens = self._train_step(groups[g])
                    elapsed = time.perf_counter() - began
                    self.train_time += elapsed
                    self.tokens += tokens
                    self.step += 1
                    self.position = (epoch, g + 1) if g + 1 < len(groups) else (epoch + 1, 0)
                    row = {"type": "train", "step": self.step, "epoch": round(epoch + (g + 1) / len(groups), 4),
                           "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1)}
                    self._log(row)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
                    if self.on_step is not None:
                        self.on_step(self, row)
                    # a stop request on any rank stops every rank after this step
                    self._stop = self.dist.all_sum([float(self._stop)])[0] > 0
                    finished = self.step >= self.total_steps
                    due = settings.eval_every and self.step % settings.eval_every == 0
                    evaluated = False
                    if self.dev is not None and (due or g + 1 == len(groups) or finished):
                        self._evaluate(row["epoch"])
                        evaluated = True
                    save_due = settings.save_every and self.step % settings.save_every == 0
                    if evaluated or save_due or self._stop or finished:
                        self.save_checkpoint()
                        self._saved_step = self.step
                    if self._stop:
                        raise Interrupted(
                            f"interrupted at step {self.step}/{self.total_steps}; checkpoint written to "
                            f"{self.checkpoint_path}; run the same command with --resume to continue"
                        )
                epoch, start_group = epoch + 1, 0
        finally:
            bar.close()
        if self.dev is None:
            self.on_best(self.model)
