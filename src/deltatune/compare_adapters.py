"""``deltatune compare --adapters NAME=DIR ...``: existing adapter or run folders (a combined adapter from
``deltatune combine``, another comparison's run) evaluated, without training, as extra rows of the comparison.

Each row is exactly what ``deltatune eval --adapter DIR`` prints for the comparison's data, ``--max-length``,
``--max-eval``, ``--seed`` and ``--eval-batch-size`` (it calls the same function), so "does TIES of task A and B keep
both skills?" is one command per task's data."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_METHODS = "full,head,last-layers,lora"


def add_adapter_rows_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--adapters NAME=DIR ...`` to the ``compare`` parser."""
    parser.add_argument("--adapters", nargs="+", default=[], metavar="NAME=DIR",
                        help="existing adapter or run folders (e.g. from 'deltatune combine') evaluated, not trained, "
                        "as extra rows NAME; with --adapters and no --methods only these rows are evaluated")


def parse_adapter_rows(items: list[str], methods: list[str]) -> dict[str, Path]:
    """``["ties=DIR", ...]`` -> {row name: folder}; names must be new (not a method of the same comparison) and
    folders must exist."""
    from .train.artifacts import artifact_kind

    rows: dict[str, Path] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        name = name.strip()
        if not sep or not name or not folder:
            raise ConfigError(f"--adapters takes NAME=DIR items, got {item!r}")
        if name in rows or name in methods:
            raise ConfigError(f"row name {name!r} is given twice (in --adapters or --methods); pick another NAME")
        if not Path(folder).is_dir():
            raise ConfigError(f"--adapters {item}: folder {folder} does not exist")
        artifact_kind(Path(folder))  # an adapter, stack or run folder, else a one-line error now, before training
        rows[name] = Path(folder)
    return rows


def methods_and_rows(methods_text: str | None, items: list[str]) -> tuple[list[str], dict[str, Path]]:
    """``--methods`` (default: the four baselines and LoRA, or none when ``--adapters`` are given) and the rows."""
    listed = methods_text if methods_text is not None else "" if items else DEFAULT_METHODS
    methods = [m.strip() for m in listed.split(",") if m.strip()]
    rows = parse_adapter_rows(items, methods)
    if not methods and not rows:
        raise ConfigError(f"--methods is empty; e.g. --methods {DEFAULT_METHODS} (or give --adapters NAME=DIR)")
    return methods, rows


def _file_params(directory: Path) -> int:
    """Number of values stored in a folder's weights files (the adapter's trainable parameters)."""
    from math import prod

    from .train.artifacts import artifact_files
    from .train.inference import _tensor_shapes

    files = [p for p in artifact_files(directory) if p.suffix == ".safetensors"]
    return sum(prod(shape) for path in files for shape, _ in _tensor_shapes(path).values())


def _base_params(model: str) -> int:
    """Parameters of the base model, read from its safetensors headers (nothing is loaded)."""
    from math import prod

    from .train.inference import _tensor_shapes
    from .train.models import resolve_model

    files = sorted(Path(resolve_model(model)).glob("*.safetensors"))
    return sum(prod(shape) for path in files for shape, _ in _tensor_shapes(path).values())


def evaluate_adapter(base: Any, name: str, folder: Path) -> dict[str, Any]:
    """One comparison row for ``folder``: ``deltatune eval`` of it on the comparison's data and settings."""
    from .train.artifacts import artifact_size
    from .train.inference import run_eval
    from .train.run import read_run

    args = argparse.Namespace(
        adapter=str(folder), data=base.data, model=base.model, task=None if base.task == "auto" else base.task,
        fields=dict(base.fields), max_length=base.max_length, chat_template=base.chat_template, max_eval=base.max_eval,
        seed=base.seed, batch_size=base.eval_batch_size, split=None, predictions=None, quantize=None,
        threads=base.threads, generate=False,
    )
    metrics = run_eval(args)
    metric = base.metric or ("accuracy" if "accuracy" in next(iter(metrics.values()), {}) else "loss")
    trainable = _file_params(folder)
    total = _base_params(base.model) + trainable
    run = read_run(folder) or {}
    return {
        "method": name, "source": str(folder), "evaluated": True, "metric": metric,
        "trainable_params": trainable, "total_params": total, "trainable_pct": 100.0 * trainable / max(total, 1),
        "steps": 0, "train_time_s": 0.0, "s_per_step": 0.0, "best_dev": metrics.get("dev", {}).get(metric),
        "test_metric": metrics.get("test", {}).get(metric), "dev": metrics.get("dev"), "test": metrics.get("test"),
        "adapter_bytes": artifact_size(folder), "lr": run.get("lr"), "warnings": [], "status": "evaluated",
    }


def adapter_rows(base: Any, rows: dict[str, Path]) -> list[dict[str, Any]]:
    """Evaluate every ``--adapters`` row (see ``evaluate_adapter``), saying which one runs."""
    results = []
    for name, folder in rows.items():
        print(f"== {name} (evaluating {folder})", flush=True)
        results.append(evaluate_adapter(base, name, folder))
    return results
