"""The causal-LM training fast path: the loss without full logits, and per-block activation checkpointing.

* Fused head + cross-entropy (``fused_ce``, on by default, ``--no-fused-ce``): the model runs with its output
  embedding swapped for a module that records the last hidden states and returns an empty tensor, so no
  [B, T, V] logits are made; the loss is ``fused_ce.causal_lm_loss`` on the recorded states with the head's own
  weight (a tied head is the embedding matrix: its gradient accumulates into the shared parameter). Used when the
  head is a plain ``nn.Linear`` (not adapted, not quantized), the model applies no logit transform after the head
  (soft-capping, logit scales) and the run is single-process; otherwise the plain ``model(**batch).loss``.
* Activation checkpointing (``gradient_checkpointing``: None = on for causal-LM training, ``--no-gradient-
  checkpointing`` turns it off): transformers' non-reentrant checkpointing of every ``checkpoint_every``-th decoder
  block; a checkpointed block keeps only its input and recomputes its activations in backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..errors import ConfigError
from .fused_ce import IGNORE, causal_lm_loss

LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class _Capture(nn.Module):
    """Stands in for the output embedding during one forward: keeps its input, returns an empty tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return hidden[..., :0]


def _head_slot(hf: nn.Module) -> tuple[nn.Module, str, nn.Linear] | None:
    """(parent module, attribute name, head) of a plain-Linear output embedding, else None."""
    get = getattr(hf, "get_output_embeddings", None)
    head = get() if get is not None else None
    if type(head) is not nn.Linear:
        return None
    for path, module in hf.named_modules():
        if module is head:
            parent_path, _, name = path.rpartition(".")
            return hf.get_submodule(parent_path) if parent_path else hf, name, head
    return None


def fused_blocker(hf: nn.Module) -> str | None:
    """Why the fused loss cannot stand in for this model's loss, or None when it can."""
    if _head_slot(hf) is None:
        return "its output head is not a plain Linear layer (adapted or quantized)"
    config = getattr(hf, "config", None)
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"it transforms its logits after the head ({name}={value})"
    return None


@contextlib.contextmanager
def captured_hidden(hf: nn.Module) -> Iterator[tuple[_Capture, nn.Linear]]:
    """While inside, ``hf``'s output embedding records its input instead of computing logits."""
    slot = _head_slot(hf)
    if slot is None:
        raise RuntimeError(f"fused loss: {fused_blocker(hf)}")
    parent, name, head = slot
    capture = _Capture()
    parent._modules[name] = capture  # not setattr: keeps the tied-weights bookkeeping of the model untouched
    try:
        yield capture, head
    finally:
        parent._modules[name] = head


def fused_causal_lm_loss(forward_model: nn.Module, hf: nn.Module, batch: dict[str, torch.Tensor], eager: bool = True,
                         reduction: str = "mean") -> torch.Tensor:
    """The causal-LM loss of ``batch`` (mean over labels != -100; or their sum) through ``forward_model`` (the model
    or its DeltaModel), computed by ``fused_ce`` from the last hidden states: equal to ``forward_model(**batch).loss``."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with captured_hidden(hf) as (capture, head):
        forward_model(**inputs)
    hidden, labels = capture.hidden, batch["labels"]
    extra = hidden.shape[1] - labels.shape[1] if hidden is not None else -1
    if extra < 0 or hidden.shape[0] != labels.shape[0]:
        raise RuntimeError("fused loss: the model's hidden states do not line up with the labels; run with --no-fused-ce")
    if extra:  # prompt-kind virtual tokens come first and have no targets (as deltatune's prompt methods label them)
        labels = torch.cat([labels.new_full((labels.shape[0], extra), IGNORE), labels], dim=1)
    return causal_lm_loss(hidden, labels, head.weight, head.bias, eager=eager, reduction=reduction)


def loss_function(
    forward_model: nn.Module, hf: nn.Module, task: str, enabled: bool, distributed: bool,
) -> Callable[[dict[str, torch.Tensor]], torch.Tensor] | None:
    """The fused loss of a micro-batch when enabled and usable for this run, else None (``model(**b).loss``)."""
    if task != "causal-lm" or not enabled or distributed or fused_blocker(hf) is not None:
        return None
    return lambda batch: fused_causal_lm_loss(forward_model, hf, batch)


def checkpointing_wanted(setting: bool | None, task: str) -> bool:
    """``--gradient-checkpointing`` / ``--no-gradient-checkpointing``; unset: on for causal-LM training."""
    return setting if setting is not None else task == "causal-lm"


def enable_checkpointing(hf: nn.Module, every: int = 1) -> int:
    """Non-reentrant activation checkpointing of every ``every``-th decoder block; returns how many blocks are."""
    if every < 1:
        raise ConfigError(f"--checkpoint-every must be at least 1, not {every}")
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(hf.config, "use_cache"):
        hf.config.use_cache = False
    blocks = [m for m in hf.modules() if getattr(type(m), "gradient_checkpointing", None) is not None
              and hasattr(m, "_gradient_checkpointing_func")]
    for number, block in enumerate(blocks):
        block.gradient_checkpointing = number % every == 0
    return sum(bool(b.gradient_checkpointing) for b in blocks)
