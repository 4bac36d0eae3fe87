"""One training run end to end: data -> model + method -> trainer -> best weights, test metrics, ``run.json``,
``metrics.jsonl`` and a plot in the run folder."""

from __future__ import annotations

import dataclasses
import json
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..model import DeltaModel
from .artifacts import CHECKPOINT, artifact_size, atomic_write
from .batching import Encoded, encode_causal_lm, encode_classification
from .data import DataError, Fields, detect_task, is_labeled, label_space, load_splits, subset
from .health import head_lr, run_health
from .label_words import check_words, verbalize
from .lm_fast import checkpointing_wanted, enable_checkpointing
from .models import (
    head_modules,
    load_model,
    load_tokenizer,
    prepare_method,
    quantize_base,
    quiet_transformers,
    resolve_model,
    trainable_head_params,
    unwrap_hf,
)
from .options import BASELINES, build_configs, default_lr, method_parts
from .preflight import check_metric, check_out_folder, clean_leftovers
from .settings import RunSettings
from .tasks import evaluate

RUN_FILE = "run.json"


@dataclass
class DataBundle:
    task: str
    labels: list[str] | int | None
    encoded: dict[str, Encoded]
    info: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # the raw rows behind ``encoded``

    @property
    def num_classes(self) -> int:
        return self.labels if isinstance(self.labels, int) else len(self.labels or [])


def prepare_data(
    settings: RunSettings,
    tokenizer: Any,
    need_train: bool = True,
    labels: list[str] | int | None = None,
    only: list[str] | None = None,
    skip: tuple[str, ...] = (),
) -> DataBundle:
    """Read, subset and tokenise the splits of ``settings.data`` (``only`` these, if given); the label space comes
    from the full train split (else ``labels``, else the first split)."""
    splits, origins = load_splits(settings.data)
    if only is not None:
        missing = [s for s in only if s not in splits]
        if missing:
            raise DataError(f"{settings.data} has no {', '.join(missing)} split (found: {', '.join(splits)})")
    fields = Fields(**settings.fields)
    if need_train and "train" not in splits:
        raise DataError(f"no train split in {settings.data} (found: {', '.join(splits) or 'none'}); add train.jsonl(.gz)")
    reference = splits.get("train") or next(iter(splits.values()))
    task = detect_task(reference, fields) if settings.task == "auto" else settings.task
    info: dict[str, Any] = {"source": settings.data, "files": origins, "rows": {s: len(r) for s, r in splits.items()}}
    words = None
    if task == "causal-lm" and settings.label_words is not None:  # classification rows judged by generated words
        space = label_space(reference, fields.label)
        words = check_words(settings.label_words, space)
    if task == "classification" or words:
        labels = labels if labels is not None or words else label_space(reference, fields.label)
        for split in [s for s in ("dev", "test") if s in splits]:
            if not is_labeled(splits[split], fields.label):
                info.setdefault("skipped", []).append(f"{split} (no labels)")
                del splits[split]
    encoded: dict[str, Encoded] = {}
    raw: dict[str, list[dict[str, Any]]] = {}
    info["subset"] = {}
    for split, rows in splits.items():
        if (only is not None and split not in only) or split in skip:
            continue
        limit = settings.max_train if split == "train" else settings.max_eval
        rows, indices = subset(rows, limit, settings.seed)
        info["subset"][split] = {"seed": settings.seed, "size": len(rows), "indices": indices}
        if words:
            rows = verbalize(rows, fields, space, words, split)
        raw[split] = rows
        if task == "classification":
            encoded[split] = encode_classification(tokenizer, rows, fields, labels, settings.max_length, split)
        else:
            encoded[split] = encode_causal_lm(tokenizer, rows, fields, settings.max_length, split, settings.chat_template)
            report_truncation(encoded[split], split, settings.max_length, info)
    return DataBundle(task, labels if task == "classification" else None, encoded, info, raw)


def report_truncation(data: Encoded, split: str, max_length: int, info: dict[str, Any]) -> None:
    """Say (stderr, and ``info`` for run.json) which rows lost their completion to ``max_length``."""
    if not data.dropped and not data.cut:
        return
    info.setdefault("truncated", {})[split] = {"dropped": data.dropped, "cut": data.cut}
    if data.dropped:
        shown = ", ".join(map(str, data.dropped[:5])) + (", ..." if len(data.dropped) > 5 else "")
        print(f"deltatune: {len(data.dropped)} {split} rows dropped: --max-length {max_length} cuts away their whole "
              f"completion (rows {shown} of the {split} subset); raise --max-length to keep them", file=sys.stderr)
    if data.cut:
        print(f"deltatune: {data.cut} {split} rows have their completion shortened by --max-length {max_length}",
              file=sys.stderr)


def versions() -> dict[str, str]:
    from .. import __version__

    out = {"deltatune": __version__, "torch": torch.__version__, "python": sys.version.split()[0], "platform": platform.platform()}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    return out


def peak_rss_bytes() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def read_run(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    return record if isinstance(record, dict) else None  # anything else was not written by deltatune


def write_run(run_dir: Path, record: dict[str, Any]) -> None:
    text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(run_dir / RUN_FILE, lambda p: Path(p).write_text(text, encoding="utf-8"))


def check_run_folder(settings: RunSettings, run_dir: Path, overwrite: bool = False) -> None:
    """A run folder with a previous run may only be continued with the same settings (``--resume``); a run that
    failed before writing a checkpoint has nothing to continue, so it may be started over."""
    check_out_folder(run_dir, read_run)
    previous = read_run(run_dir)
    if previous is None or overwrite:
        return
    if previous.get("status") in ("failed", "interrupted") and not (run_dir / CHECKPOINT).is_file():
        return
    if not settings.resume:
        raise ConfigError(
            f"{run_dir} already holds a run ({previous.get('status')}); pass --resume to continue it, --overwrite to "
            f"start over, or choose another --out"
        )
    old = RunSettings.from_dict(previous.get("settings", {})).identity()
    changed = sorted(k for k, v in settings.identity().items() if old.get(k) != v)
    if changed:
        raise ConfigError(f"cannot resume {run_dir}: settings changed ({', '.join(changed)}); use the original settings or another --out")


def _with_head_lr(
    settings: RunSettings, lr: float, fresh_head: bool, baseline: bool, record: dict[str, Any], main: bool,
    previous: dict[str, Any] | None = None,
) -> RunSettings:
    """The settings the trainer uses: ``head_lr`` filled in for a fresh head (``health.head_lr``), said aloud.

    Resuming (``previous``: the run's earlier record), the head keeps the rate the run was started with, as
    ``run.json`` recorded it (runs from before the floor, or under an older floor, resume exactly)."""
    chosen = head_lr(settings.head_lr, lr, fresh_head, baseline)
    if previous is not None and settings.head_lr is None:
        recorded = previous.get("head_lr", lr)  # no head_lr recorded: the head trained at --lr
        chosen = None if recorded == lr else float(recorded)
        if main and not settings.quiet and chosen != head_lr(None, lr, fresh_head, baseline):
            print(f"head lr {recorded:g}: kept from run.json, as this run was started (a new run would train the "
                  f"head at {head_lr(None, lr, fresh_head, baseline) or lr:g})", flush=True)
    record["head_lr"] = chosen or lr
    if chosen == settings.head_lr:
        return settings
    if main and not settings.quiet and previous is None:
        print(f"head lr {chosen:g}: the fresh task head trains at least at this rate (the adapters at --lr {lr:g}); "
              f"--head-lr sets it", flush=True)
    return dataclasses.replace(settings, head_lr=chosen)


def count(model: nn.Module) -> tuple[int, int]:
    if isinstance(model, DeltaModel):
        return model.count_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def run_training(
    settings: RunSettings,
    overwrite: bool = False,
    on_step: Callable[[Any, dict[str, Any]], None] | None = None,
    shard: bool = False,
) -> dict[str, Any]:
    """Train one run into ``settings.out``; returns the run record (also written to ``run.json``).

    Under a multi-process launcher (torchrun, ``--nproc``) the run is data-parallel (DDP, or FSDP2 with
    ``shard``); rank 0 writes every file (see ``deltatune.train.distributed``)."""
    from .distributed import setup
    from .trainer import Interrupted

    dist = setup(shard)
    started: dict[str, Any] = {}
    try:
        return _run_training(settings, overwrite, on_step, dist, started)
    except BaseException as error:  # a run that stops anywhere after it was recorded is recorded as stopped
        record = started.get("record")
        if record is not None and record.get("status") == "running" and dist.is_main:
            stopped = isinstance(error, (KeyboardInterrupt, Interrupted))
            record.update(status="interrupted" if stopped else "failed", error=f"{type(error).__name__}: {error}")
            write_run(Path(settings.out), record)
        raise


def _method_configs(settings: RunSettings) -> tuple[str, Any, Any]:
    """(method, [(name, config)] or None for a baseline, the config(s) as recorded in ``run.json``)."""
    method = "+".join(method_parts(settings.method))
    if method in BASELINES and (settings.method_options or settings.config_values):
        given = ", ".join("--" + k.replace("_", "-") for k in [*settings.method_options, *settings.config_values])
        raise ConfigError(f"option {given} does not apply to method '{method}' (a baseline; its only option is --k)")
    configs = None if method in BASELINES else build_configs(method, settings.method_options, settings.config_values)
    recorded: Any = None  # run.json: a single method's PEFT config, or {adapter name: PEFT config} for a stack
    if configs is not None:
        recorded = {n: c.to_peft_dict() for n, c in configs} if len(configs) > 1 else configs[0][1].to_peft_dict()
    return method, configs, recorded


def _prepare_folder(settings: RunSettings, run_dir: Path, overwrite: bool, dist: Any, main: bool) -> dict[str, Any] | None:
    """Ready the (checked) run folder; returns the earlier record when this run resumes from its checkpoint."""
    previous = read_run(run_dir)
    resuming = previous if settings.resume and previous is not None and (run_dir / CHECKPOINT).is_file() else None
    dist.barrier()  # every rank has checked the folder before rank 0 writes into it
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_leftovers(run_dir)
    if main and overwrite and not settings.resume:
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
    return resuming


def _build_model(
    settings: RunSettings, model_path: str, data: DataBundle, method: str, configs: Any, lr: float, pad_id: int,
    record: dict[str, Any], main: bool, previous: dict[str, Any] | None,
) -> tuple[nn.Module, RunSettings, list[str]]:
    """(the model with the method applied, the trainer's settings, the head's module paths)."""
    model, fresh = load_model(model_path, data.task, data.num_classes or 2,
                              data.labels if isinstance(data.labels, list) else None, settings.seed, pad_id)
    heads = head_modules(model, fresh, data.task)
    trainer_settings = _with_head_lr(settings, lr, bool(fresh), method in BASELINES, record, main, previous)
    if settings.quantize:
        quantize_base(model, settings.quantize, configs is None, method)
    model = prepare_method(model, method, configs, heads, data.task, settings.k)
    if checkpointing_wanted(settings.gradient_checkpointing, data.task):
        record["checkpointed_blocks"] = enable_checkpointing(unwrap_hf(model), settings.checkpoint_every)
    return model, trainer_settings, heads


def _results(trainer: Any, summary: dict[str, Any], model: nn.Module, data: DataBundle, settings: RunSettings,
             method: str, lr: float, counts: tuple[int, int], pad_id: int) -> dict[str, Any]:
    """The run's results: sizes, times, best dev, test metrics of the kept weights, health and warnings."""
    trainable, total = counts
    results: dict[str, Any] = {
        "method": method, "trainable_params": trainable, "total_params": total,
        "trainable_pct": 100.0 * trainable / max(total, 1), "steps": summary["steps"],
        "train_time_s": summary["train_time"], "s_per_step": summary["train_time"] / max(summary["steps"], 1),
        "tokens": summary["tokens"], "metric": trainer.metric, "best_dev": summary["best"], "best_step": summary["best_step"],
    }
    best_eval = [r for r in trainer.history if r["type"] == "eval" and r["step"] == summary["best_step"]]
    if best_eval:  # the dev metrics of the kept weights were computed when they were kept
        results["dev"] = {k: v for k, v in best_eval[-1].items() if k not in ("type", "split", "step", "epoch")}
    tested = None
    if "test" in data.encoded:
        tested = evaluate(model, data.encoded["test"], data.task, pad_id, settings.eval_batch_size, data.num_classes,
                          settings.bf16)
        results["test"] = {k: v for k, v in tested.items() if isinstance(v, (int, float))}
    results["test_metric"] = results.get("test", {}).get(trainer.metric)
    results["health"], results["warnings"] = _health(trainer.history, model, data, settings, lr, tested, pad_id)
    return results


def _health(history: list[dict[str, Any]], model: nn.Module, data: DataBundle, settings: RunSettings, lr: float,
            tested: dict[str, Any] | None, pad_id: int) -> tuple[str, list[str]]:
    """``health.run_health`` of the run: the majority-class check on the test split, else on the dev split (the
    kept weights' predictions), for classification."""
    split = "test" if "test" in data.encoded else "dev" if "dev" in data.encoded else None
    evaluated = None
    if data.task == "classification" and split is not None:
        evaluated = tested if split == "test" else evaluate(
            model, data.encoded[split], data.task, pad_id, settings.eval_batch_size, data.num_classes, settings.bf16)
    labels = data.encoded[split].labels if evaluated is not None and split is not None else None
    return run_health(history, lr, evaluated, labels, data.labels, split or "test")


def _fit(trainer: Any, settings: RunSettings, record: dict[str, Any], run_dir: Path, main: bool) -> dict[str, Any]:
    """``trainer.fit``; a stop (Ctrl-C, a failed step) is recorded in ``run.json`` before it propagates."""
    from .trainer import Interrupted, TrainingError

    try:
        return trainer.fit(resume=settings.resume)
    except (Interrupted, TrainingError, KeyboardInterrupt) as error:
        record["status"] = "interrupted" if not isinstance(error, TrainingError) else "failed"
        record["error"] = str(error)
        if main:
            write_run(run_dir, record)
        raise


def _run_training(
    settings: RunSettings, overwrite: bool, on_step: Callable[[Any, dict[str, Any]], None] | None, dist: Any,
    started: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from ..report import plot_run
    from .trainer import Trainer

    main, run_dir = dist.is_main, Path(settings.out)
    quiet_transformers()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    method, configs, recorded = _method_configs(settings)
    check_run_folder(settings, run_dir, overwrite)
    finished = read_run(run_dir)
    if finished and settings.resume and finished.get("status") == "done":
        return finished
    previous = _prepare_folder(settings, run_dir, overwrite, dist, main)
    model_path = resolve_model(settings.model)
    tokenizer = load_tokenizer(model_path)
    data = prepare_data(settings, tokenizer)
    check_metric(settings.metric, data.task)
    lr = settings.lr or default_lr(method)
    record: dict[str, Any] = {
        "status": "running", "settings": settings.to_dict(), "model_path": model_path, "task": data.task,
        "labels": data.labels, "lr": lr, "head_lr": settings.head_lr or lr, "versions": versions(), "data": data.info,
        "config": recorded,
    }
    if main:
        write_run(run_dir, record)
    if started is not None:
        started["record"] = record
    pad_id = tokenizer.pad_token_id
    model, trainer_settings, heads = _build_model(settings, model_path, data, method, configs, lr, pad_id, record, main,
                                                  previous)
    counts = count(model)
    info = {"base_model": model_path, "task": data.task, "labels": data.labels, "quantize": settings.quantize}
    dist.prepare(model)
    if (processes := dist.record()) is not None:
        record["distributed"] = processes
    trainer = Trainer(model, trainer_settings, data.encoded["train"], data.encoded.get("dev"), run_dir, data.task, pad_id,
                      data.num_classes, lr, on_best=lambda m: dist.save_trained(m, run_dir, method, info), on_step=on_step, dist=dist,
                      head_params=trainable_head_params(model, heads))
    torch.manual_seed(settings.seed + 1)  # dropout stream, independent of how the head was initialised
    began = time.time()
    summary = _fit(trainer, settings, record, run_dir, main)
    if trainer.best_state is not None:  # test metrics are those of the kept (best-dev) weights
        dist.restore_trainable(model, trainer.best_state)
    results = _results(trainer, summary, dist.eval_model, data, settings, method, lr, counts, pad_id)
    for warning in results["warnings"] if main else []:
        print(f"deltatune: warning: {warning}", file=sys.stderr, flush=True)
    results.update(wall_time_s=time.time() - began, peak_rss_bytes=peak_rss_bytes(), adapter_bytes=artifact_size(run_dir))
    record.update(status="done", results=results)
    record.pop("error", None)
    if main:
        write_run(run_dir, record)
        plot_run(trainer.history, run_dir / "training.png", title=f"{method} on {Path(settings.data).name}", metric=trainer.metric)
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
    return record
