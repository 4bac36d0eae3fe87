"""Did the run learn? Warnings for the silent failures a finished run can hide: a diverged loss, and predictions
no better than always answering the majority class. They go to the console, ``run.json`` and the compare report,
each with the likely fix."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

# a fresh classifier head learns at this rate at least when no --head-lr is given (the head-only baseline's rate):
# it reads small pooled features, so it needs large weights. At an adapter's lr it lags: LoRA at lr 3e-4 on 3,000
# SST-2 rows reached 0.566 test with the head at 3e-3 and 0.712 at 3e-2; at lr 3e-3, 3e-2 adds 0.5 to 3 points to
# every adapter method (docs/RESULTS.md section 2b)
FRESH_HEAD_LR = 3e-2
DIVERGENCE_RATIO = 1.5  # the late train loss this many times the early one (or NaN/inf) counts as diverged
COLLAPSE_SHARE = 0.95  # this share of predictions on one class counts as collapsed
MIN_ROWS = 20  # fewer evaluation rows say nothing reliable about collapse


def head_lr(given: float | None, lr: float, fresh_head: bool, baseline: bool) -> float | None:
    """The learning rate of the task head: ``--head-lr`` when given; for an adapter method over a fresh head, at
    least ``FRESH_HEAD_LR`` (so the head does not silently follow a small adapter rate); else ``None`` (= lr)."""
    if given is not None:
        return given
    if fresh_head and not baseline and lr < FRESH_HEAD_LR:
        return FRESH_HEAD_LR
    return None


def divergence(history: list[dict[str, Any]], lr: float) -> str | None:
    """A warning when the train loss ended far above where it started, or is NaN/inf."""
    losses = [r["loss"] for r in history if r.get("type") == "train" and isinstance(r.get("loss"), (int, float))]
    if len(losses) < 4:
        return None
    window = max(1, min(5, len(losses) // 4))
    first, last = min(losses[:window]), sum(losses[-window:]) / window  # the start before any spike; the end, smoothed
    if math.isfinite(last) and last <= DIVERGENCE_RATIO * first:
        return None
    return (f"training diverged: the train loss went from {first:.4g} to {last:.4g}; the learning rate {lr:g} is too "
            f"high for this method: retry with --lr {lr / 10:g} (or lower)")


def majority_level(predictions: list[int], labels: list[int], names: list[str] | None, split: str) -> str | None:
    """A warning when ``split`` accuracy is no better than always predicting the most common label, saying
    whether the predictions collapsed onto one class."""
    if len(labels) < MIN_ROWS or len(predictions) != len(labels):
        return None
    majority, count = Counter(labels).most_common(1)[0]
    accuracy = sum(int(p == t) for p, t in zip(predictions, labels)) / len(labels)
    if accuracy > count / len(labels) + 0.01:
        return None
    top, top_count = Counter(predictions).most_common(1)[0]
    name = names[top] if names and 0 <= top < len(names) else top
    collapsed = (f"the predictions collapsed to one class ({top_count / len(predictions):.0%} are '{name}')"
                 if top_count / len(predictions) >= COLLAPSE_SHARE else "the model guesses")
    return (f"{split} accuracy {accuracy:.3f} is no better than always predicting the majority class "
            f"({count / len(labels):.3f}): {collapsed}. The run learned nothing useful: train longer (more rows or "
            f"--epochs), raise --lr / --head-lr, or check the labels")


def run_warnings(history: list[dict[str, Any]], lr: float, evaluated: dict[str, Any] | None, labels: list[int] | None,
                 names: Any, split: str) -> list[str]:
    """Every warning for one finished run (``evaluated``: ``tasks.evaluate`` output on ``split``)."""
    found = [divergence(history, lr)]
    if evaluated is not None and labels is not None and "predictions" in evaluated:
        found.append(majority_level(evaluated["predictions"], list(labels), names if isinstance(names, list) else None, split))
    return [w for w in found if w]
