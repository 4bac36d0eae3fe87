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
SPIKE_RATIO = 10.0  # a smoothed train loss this many times the start counts as diverged even if it came back
COLLAPSE_DROP = 0.2  # dev accuracy this far below its best at the end counts as collapsed


def head_lr(given: float | None, lr: float, fresh_head: bool, baseline: bool) -> float | None:
    """The learning rate of the task head: ``--head-lr`` when given; for an adapter method over a fresh head, at
    least ``FRESH_HEAD_LR`` (so the head does not silently follow a small adapter rate); else ``None`` (= lr)."""
    if given is not None:
        return given
    if fresh_head and not baseline and lr < FRESH_HEAD_LR:
        return FRESH_HEAD_LR
    return None


def divergence(history: list[dict[str, Any]], lr: float) -> str | None:
    """A warning when the train loss ended far above where it started, or is NaN/inf; or, when it came back
    down, when it spiked to ``SPIKE_RATIO`` times the start on the way (the weights may be wrecked anyway)."""
    losses = [r["loss"] for r in history if r.get("type") == "train" and isinstance(r.get("loss"), (int, float))]
    if len(losses) < 4:
        return None
    window = max(1, min(5, len(losses) // 4))
    first, last = min(losses[:window]), sum(losses[-window:]) / window  # the start before any spike; the end, smoothed
    fix = f"the learning rate {lr:g} is too high for this method: retry with --lr {lr / 10:g} (or lower)"
    if not math.isfinite(last) or last > DIVERGENCE_RATIO * first:
        return f"training diverged: the train loss went from {first:.4g} to {last:.4g}; {fix}"
    means = [sum(losses[i:i + window]) / window for i in range(len(losses) - window + 1)]
    peak = max(range(len(means)), key=lambda i: means[i])
    if means[peak] > SPIKE_RATIO * first:
        return (f"training diverged on the way: the train loss spiked from {first:.4g} to {means[peak]:.4g} around "
                f"step {peak + window} before ending at {last:.4g}; {fix}")
    return None


def dev_collapse(history: list[dict[str, Any]], lr: float) -> str | None:
    """A warning when the dev accuracy ended ``COLLAPSE_DROP`` or more below its best: the later steps undid
    what the run had learned (the kept weights are the best step's)."""
    evals = [r for r in history if r.get("type") == "eval" and isinstance(r.get("accuracy"), (int, float))]
    if len(evals) < 2:
        return None
    best = max(evals, key=lambda r: r["accuracy"])
    last = evals[-1]
    if best["accuracy"] - last["accuracy"] < COLLAPSE_DROP:
        return None
    return (f"dev accuracy collapsed from {best['accuracy']:.3f} (step {best['step']}) to {last['accuracy']:.3f} "
            f"(step {last['step']}): training became unstable; the weights of step {best['step']} are kept. Retry "
            f"with --lr {lr / 10:g} or fewer steps")


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
    return run_health(history, lr, evaluated, labels, names, split)[1]


def run_health(history: list[dict[str, Any]], lr: float, evaluated: dict[str, Any] | None, labels: list[int] | None,
               names: Any, split: str) -> tuple[str, list[str]]:
    """(health, warnings) of one finished run: health is "ok", "diverged" (the loss or dev accuracy blew up) or
    "learned nothing" (``split`` accuracy no better than the majority class); recorded in ``run.json``."""
    diverged = [w for w in (divergence(history, lr), dev_collapse(history, lr)) if w]
    useless = None
    if evaluated is not None and labels is not None and "predictions" in evaluated:
        useless = majority_level(evaluated["predictions"], list(labels), names if isinstance(names, list) else None, split)
    health = "diverged" if diverged else "learned nothing" if useless else "ok"
    return health, diverged + ([useless] if useless else [])
