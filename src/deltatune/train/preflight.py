"""Checks run before a training run does any work, so bad options fail in one line (exit code 2) instead of a
traceback minutes later, and a run folder never takes over files deltatune did not write."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

# settings that must be finite numbers when given (inf epochs would loop forever, NaN lr trains nothing)
FLOAT_SETTINGS = ("epochs", "lr", "head_lr", "warmup", "weight_decay", "max_grad_norm", "loraplus_ratio")
METRICS = {"classification": ("accuracy", "f1", "mcc", "loss"), "causal-lm": ("loss", "perplexity")}
# files a run folder may hold before its run.json exists: compare's per-run settings, temp files of atomic writes
OWN_BEFORE_RUN = {"settings.json"}
COMPARE_FILES = {"results.json", "report.md", "metric_vs_params.png", "loss_curves.png", "base.json"}
MAX_THREADS = 4096


def check_numbers(settings: Any) -> None:
    """Every float option finite, ``--threads`` >= 1, ``--metric`` a metric some task computes."""
    for name in FLOAT_SETTINGS:
        value = getattr(settings, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value!r}")
    if settings.threads is not None and not 1 <= settings.threads <= MAX_THREADS:
        raise ConfigError(f"--threads must be between 1 and {MAX_THREADS}, got {settings.threads}; omit it to use torch's default")
    known = sorted({m for names in METRICS.values() for m in names})
    if settings.metric is not None and settings.metric not in known:
        raise ConfigError(f"--metric {settings.metric!r} is not computed by deltatune; choose from {', '.join(known)}")


def check_metric(metric: str | None, task: str) -> None:
    """``--metric`` must be one the task computes (checked as soon as the task is known, before training)."""
    if metric is not None and metric not in METRICS.get(task, (metric,)):
        raise ConfigError(f"--metric {metric} is not computed for {task}; choose from {', '.join(METRICS[task])}")


def check_optimizer(name: str, arguments: dict[str, Any]) -> None:
    """Build ``torch.optim.<name>`` with ``arguments`` over a dense weight and bias and take a step, so an optimizer
    that cannot train these models (``SparseAdam`` needs sparse gradients, ``Muon`` 2-D parameters only) or
    rejects its arguments fails now."""
    classes = {n.lower(): c for n, c in vars(torch.optim).items() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)}
    cls = classes.get(str(name).lower())
    if cls is None or cls is torch.optim.Optimizer:
        raise ConfigError(f"unknown optimizer {name!r}; torch.optim has {', '.join(sorted(classes))}")
    probes = [torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))]  # a weight and a bias
    try:
        optimizer = cls(probes, lr=1e-3, **arguments)
        for probe in probes:
            probe.grad = torch.ones_like(probe)
        if cls is torch.optim.LBFGS:
            optimizer.step(lambda: sum(p.sum() for p in probes))
        else:
            optimizer.step()
    except Exception as error:  # any failure here would have been a traceback at the first training step
        raise ConfigError(
            f"--optimizer {name} with --optimizer-args {json.dumps(arguments)} cannot train these models (dense weights and biases): "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}; use adamw or sgd, or fix the arguments"
        ) from error


def check_out_folder(run_dir: Path, read_run: Any) -> None:
    """``--out`` must be a new folder, an empty one, or a run folder deltatune wrote (a readable ``run.json``);
    never a folder of someone else's files, and no part of the path may be a file."""
    for folder in [run_dir, *run_dir.parents]:
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--out {run_dir}: {folder} is a file, not a folder; choose another --out")
    if not run_dir.is_dir() or read_run(run_dir) is not None:
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in OWN_BEFORE_RUN and not is_leftover(p))
    if foreign:
        state = "an unreadable run.json" if (run_dir / "run.json").exists() else "no run.json"
        raise ConfigError(
            f"--out {run_dir} holds files deltatune did not write ({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}; "
            f"{state}); deltatune writes only into new or empty folders or its own run folders: choose another --out"
        )


def check_compare_folder(out: Path, read_run: Any) -> None:
    """``compare --out`` must be new, empty, or hold only what compare writes: its report files and run folders."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out")
    if not out.is_dir():
        return
    foreign = sorted(
        p.name for p in out.iterdir()
        if p.name not in COMPARE_FILES and not is_leftover(p)
        and not (p.is_dir() and (read_run(p) is not None or (p / "settings.json").is_file() or not any(p.iterdir())))
    )
    if foreign:
        raise ConfigError(
            f"--out {out} holds files deltatune did not write ({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); "
            f"compare writes only into new or empty folders or its own: choose another --out"
        )


def is_leftover(path: Path) -> bool:
    """A temp file of an atomic write that was killed (``.<name>.<random>.tmp``)."""
    return path.is_file() and path.name.startswith(".") and path.name.endswith(".tmp") and path.name.count(".") >= 3


def clean_leftovers(run_dir: Path) -> list[Path]:
    """Delete temp files that killed writes left in the run folder and its adapter subfolders (the run owns the
    folder now, so no other writer is mid-write). Returns what was removed."""
    removed = []
    for folder in [run_dir, *(p for p in run_dir.iterdir() if p.is_dir())] if run_dir.is_dir() else []:
        for path in folder.iterdir():
            if is_leftover(path):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
