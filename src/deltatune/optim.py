"""Optimizer helpers for the LoRA family: LoRA+ parameter groups and ReLoRA restarts.

LoRA+ (Hayou et al. 2024, arXiv 2402.12354): train B with a larger learning rate than A, ``lr_B = ratio * lr_A``.
ReLoRA (Lialin et al. 2023, arXiv 2307.05695): every N steps merge ``s B A`` into W0, re-initialise A (Kaiming)
and B (zero), prune the optimizer state of the LoRA parameters and restart a jagged cosine schedule with a short
re-warmup, so that the sum of many rank-r updates can reach a high rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .config import check_positive
from .errors import ConfigError
from .layers import DeltaLayer


def lora_roles(model: nn.Module) -> dict[int, tuple[str, bool]]:
    """id(parameter) -> (role "A" | "B" | "magnitude", is_embedding) for every adapter parameter with a role (the
    deltas' ``param_roles``, see ``deltatune.protocol``)."""
    roles: dict[int, tuple[str, bool]] = {}
    for module in model.modules():
        if not isinstance(module, DeltaLayer):
            continue
        for delta in module.adapters.values():
            named = dict(delta.named_parameters())
            for key, role in delta.param_roles().items():
                if key in named:
                    roles[id(named[key])] = (role.removesuffix("_embedding"), role.endswith("_embedding"))
    return roles


def loraplus_groups(
    model: nn.Module, lr: float, ratio: float = 16.0, embedding_lr: float | None = None, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Parameter groups for LoRA+ (only parameters that require grad; empty groups are left out).

    - "lora_A": A matrices at ``lr``; "lora_B": B matrices at ``ratio * lr`` (both with ``weight_decay``).
    - "embedding": embedding LoRA A/B at ``embedding_lr`` when given (else they follow the A/B rule above).
    - "magnitude": DoRA magnitudes at ``lr``, no weight decay.
    - "other" / "other_no_decay": everything else that trains (heads, MoRA's M, biases, LayerNorm) at ``lr``;
      1-d tensors get no weight decay. Unlike PEFT we do not give biases and norms ``ratio * lr``: the LoRA+
      argument concerns the output-side factor of a product, which a bias or a norm scale is not.
    """
    check_positive("lr", lr)
    check_positive("ratio", ratio)
    roles = lora_roles(model)
    groups: dict[str, dict[str, Any]] = {
        "lora_A": {"params": [], "lr": lr, "weight_decay": weight_decay},
        "lora_B": {"params": [], "lr": lr * ratio, "weight_decay": weight_decay},
        "embedding": {"params": [], "lr": embedding_lr, "weight_decay": weight_decay},
        "magnitude": {"params": [], "lr": lr, "weight_decay": 0.0},
        "other": {"params": [], "lr": lr, "weight_decay": weight_decay},
        "other_no_decay": {"params": [], "lr": lr, "weight_decay": 0.0},
    }
    seen: set[int] = set()
    for parameter in model.parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        role, embedding = roles.get(id(parameter), (None, False))
        if embedding and embedding_lr is not None:
            name = "embedding"
        elif role in ("A", "B"):
            name = f"lora_{role}"
        elif role == "magnitude":
            name = "magnitude"
        else:
            name = "other" if parameter.ndim >= 2 else "other_no_decay"
        groups[name]["params"].append(parameter)
    return [{"name": name, **group} for name, group in groups.items() if group["params"]]


def loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    lr: float = 1e-4,
    ratio: float = 16.0,
    embedding_lr: float | None = None,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer over ``model``'s trainable parameters with LoRA+ groups (see ``loraplus_groups``)."""
    groups = loraplus_groups(model, lr, ratio, embedding_lr, weight_decay)
    if not groups:
        raise ConfigError("the model has no trainable parameters; activate an adapter first (model.set_adapter)")
    return optimizer_cls(groups, lr=lr, **kwargs)


def prune_state(state: dict[str, Any], parameter: torch.Tensor, prune: float) -> None:
    """Zero the smallest-magnitude fraction ``prune`` of each state tensor shaped like ``parameter`` (1.0: all)."""
    for value in state.values():
        if not isinstance(value, torch.Tensor) or value.shape != parameter.shape:
            continue
        if prune >= 1.0:
            value.zero_()
            continue
        k = int(prune * value.numel())
        if k > 0:
            threshold = value.abs().flatten().float().kthvalue(k).values
            value.masked_fill_(value.abs() <= threshold, 0)


class ReLoRA:
    """ReLoRA restarts and jagged cosine LR for a ``DeltaModel`` with LoRA adapters; call ``step()`` after each
    ``optimizer.step()``.

    every: steps between restarts; prune: fraction of LoRA optimizer state zeroed by magnitude at a restart
    (``reset="full"`` zeroes it all); warmup: re-warmup steps after a restart (linear from 0);
    initial_warmup: warmup at the start (default ``warmup``); total_steps: length of the cosine decay (None: no
    decay, only the jagged re-warmups); min_lr_ratio: the cosine floor; adapter: which adapter (default: active).
    Learning rates are multiplied into each group's lr as it was when ReLoRA was created.
    """

    def __init__(
        self,
        model: Any,
        optimizer: torch.optim.Optimizer,
        every: int,
        prune: float = 0.99,
        warmup: int = 50,
        initial_warmup: int | None = None,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        reset: str = "prune",
        adapter: str | None = None,
    ) -> None:
        check_positive("every", every)
        check_positive("warmup", warmup, allow_zero=True)
        if not 0 <= prune <= 1 or reset not in ("prune", "full"):
            raise ConfigError(f"prune must be in [0, 1] and reset 'prune' or 'full', got {prune!r}, {reset!r}")
        self.model, self.optimizer = model, optimizer
        self.every, self.prune, self.warmup, self.reset = every, prune, warmup, reset
        self.initial_warmup = warmup if initial_warmup is None else initial_warmup
        self.total_steps, self.min_lr_ratio = total_steps, min_lr_ratio
        self.adapter = adapter or model.active_adapter
        self.deltas = self._deltas()
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.step_count = 0
        self.last_restart = 0
        self.restarts = 0
        self._apply_lr()

    def _deltas(self) -> list[tuple[DeltaLayer, nn.Module]]:
        found: list[tuple[DeltaLayer, nn.Module]] = []
        for _, host in self.model.hosts():
            if isinstance(host, DeltaLayer) and self.adapter in host.adapters:
                delta = host.adapters[self.adapter]
                if not delta.restartable:
                    raise ConfigError(f"ReLoRA restarts plain LoRA layers; adapter '{self.adapter}' has {type(delta).__name__}")
                if host.weight_for_merge is not host._parameters.get("weight"):
                    raise ConfigError("ReLoRA merges into the stored base weight; a quantized base is not supported")
                found.append((host, delta))
        if not found:
            raise ConfigError(f"adapter '{self.adapter}' has no LoRA layers for ReLoRA to restart")
        return found

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base lr at ``step``: cosine decay times a linear warmup since the last restart."""
        if self.total_steps:
            progress = min(step / self.total_steps, 1.0)
            decay = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        else:
            decay = 1.0
        warm = self.initial_warmup if self.restarts == 0 else self.warmup
        since = step - self.last_restart
        return decay * (min(1.0, (since + 1) / warm) if warm > 0 else 1.0)

    def _apply_lr(self) -> None:
        factor = self.lr_factor(self.step_count)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def lora_parameters(self) -> Iterable[nn.Parameter]:
        for _, delta in self.deltas:
            yield from delta.parameters()

    @torch.no_grad()
    def restart(self) -> None:
        """Merge ``s B A`` into W0, re-initialise A (Kaiming) and B (zero), prune the LoRA optimizer state."""
        if any(self.adapter in host.merged for host, _ in self.deltas):
            raise ConfigError(f"adapter '{self.adapter}' is merged; call model.unmerge() before ReLoRA restarts")
        for host, delta in self.deltas:
            weight = host.weight_for_merge
            weight.add_(delta.delta_weight(host).to(weight.device, weight.dtype))  # in place: bumps the version
            delta.restart()
        for parameter in self.lora_parameters():
            state = self.optimizer.state.get(parameter)
            if state:
                prune_state(state, parameter, 1.0 if self.reset == "full" else self.prune)
        self.restarts += 1
        self.last_restart = self.step_count

    def step(self) -> None:
        """Advance one training step: restart every ``every`` steps, then set the learning rate for the next step."""
        self.step_count += 1
        if self.step_count % self.every == 0:
            self.restart()
        self._apply_lr()

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "last_restart": self.last_restart, "restarts": self.restarts,
                "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count, self.last_restart = state["step_count"], state["last_restart"]
        self.restarts, self.base_lrs = state["restarts"], list(state["base_lrs"])
        self._apply_lr()
