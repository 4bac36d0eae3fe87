"""Causal-LM comparisons: the base model's row, and what each trained run is judged by besides its training record.

``deltatune compare --task causal-lm`` puts the base model (no training) first, then one row per method, with

- held-out completion loss: the loss on the completion tokens of the held-out split (``test``, else ``dev``) — for a
  trained run the value its own run recorded, for the base the same ``evaluate`` on the same rows (so it equals
  ``deltatune eval`` of the base);
- exact match: greedy generation on the first ``em_rows`` rows of that held-out subset (``deltatune.train.generation``);
- forgetting: the rise in loss on general text the task did not train on (every token a target; e.g. IMDb reviews,
  as HF PEFT's method comparison measures on Wikipedia): ``loss(run) - loss(base)`` on ``forgetting_rows`` seeded rows
  of ``forgetting_data``; 0 for the base by definition;
- train time, tokens/s, peak RSS and adapter size from the training run.

The base row and each run's extra metrics are cached (``base.json`` in the compare folder, ``lm_eval.json`` in each
run folder) under a key of the settings they depend on, so a repeated compare reuses them.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import check_positive_int
from .errors import ConfigError, DeltatuneError
from .train.artifacts import atomic_write
from .train.batching import encode_causal_lm
from .train.data import DataError, Fields, load_splits, subset
from .train.generation import compile_answer_regex, evaluate_generation
from .train.settings import RunSettings
from .train.tasks import evaluate

BASE_FILE = "base.json"
RUN_EVAL_FILE = "lm_eval.json"
BASE = "base"
# the settings a held-out / generation / forgetting number depends on (not the training budget)
DATA_KEYS = ("data", "model", "task", "fields", "max_length", "chat_template", "max_eval", "seed", "label_words")


@dataclass
class LmOptions:
    """What a causal-LM comparison measures besides the training record (see the module doc)."""

    em_rows: int = 30
    max_new_tokens: int = 256
    answer_regex: str | None = None
    forgetting_data: str | None = None
    forgetting_rows: int = 32
    samples: int = 3

    def __post_init__(self) -> None:
        if self.em_rows < 0 or self.forgetting_rows < 1 or self.samples < 0:
            raise ConfigError("--em-rows and --samples must be >= 0, --forgetting-rows >= 1")
        check_positive_int("--max-new-tokens", self.max_new_tokens)
        compile_answer_regex(self.answer_regex)
        if self.forgetting_data is not None and not Path(self.forgetting_data).is_dir():
            raise ConfigError(f"--forgetting-data {self.forgetting_data} is not a folder; pass a data folder of text "
                              f"rows (e.g. ../shared/data/imdb)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def cache_key(settings: RunSettings, options: LmOptions) -> dict[str, Any]:
    values = settings.to_dict()
    return {"settings": {k: values.get(k) for k in DATA_KEYS}, "options": options.to_dict()}


def _read_cached(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cached.get("row") if isinstance(cached, dict) and cached.get("key") == key else None


def _write_cached(path: Path, key: dict[str, Any], row: dict[str, Any]) -> None:
    text = json.dumps({"key": key, "row": row}, indent=2, default=str) + "\n"
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


# ---- the data each measurement reads -----------------------------------------------------------------------------
def heldout(settings: RunSettings, tokenizer: Any) -> tuple[str, Any]:
    """(split name, DataBundle of that split alone): ``test``, else ``dev``, subset by ``--max-eval``."""
    from .train.run import prepare_data

    splits, _ = load_splits(settings.data)
    split = "test" if "test" in splits else "dev" if "dev" in splits else None
    if split is None:
        raise DataError(f"{settings.data} has no test or dev split to hold out; add test.jsonl(.gz)")
    return split, prepare_data(settings, tokenizer, need_train=False, only=[split])


def general_text(settings: RunSettings, options: LmOptions, tokenizer: Any) -> Any:
    """The forgetting rows (``text`` field, every token a target) of ``options.forgetting_data``: its test split,
    else its train split, ``forgetting_rows`` seeded rows, cut to ``--max-length``; None without forgetting data."""
    if options.forgetting_data is None:
        return None
    splits, _ = load_splits(options.forgetting_data)
    rows = splits.get("test") or splits.get("train") or next(iter(splits.values()))
    rows, _ = subset(rows, options.forgetting_rows, settings.seed)
    if not all(isinstance(r.get("text"), str) for r in rows):
        raise DataError(f"--forgetting-data {options.forgetting_data}: rows need a 'text' field of general text")
    return encode_causal_lm(tokenizer, [{"text": r["text"]} for r in rows], Fields(), settings.max_length, "forgetting")


# ---- measuring one model -----------------------------------------------------------------------------------------
def measure(model: Any, tokenizer: Any, settings: RunSettings, options: LmOptions, split: str, data: Any,
            general: Any, with_loss: bool) -> dict[str, Any]:
    """Held-out loss (``with_loss``), exact match with its sample generations, and the general-text loss."""
    out: dict[str, Any] = {"heldout_split": split}
    if with_loss:
        result = evaluate(model, data.encoded[split], "causal-lm", tokenizer.pad_token_id, settings.eval_batch_size)
        out.update(heldout_loss=result["loss"], heldout_tokens=result["tokens"])
    if options.em_rows:
        rows = data.rows[split][: options.em_rows]
        metrics, records = evaluate_generation(
            model, tokenizer, rows, Fields(**settings.fields), settings.chat_template, options.max_new_tokens,
            min(settings.eval_batch_size, 16), options.answer_regex, split, quiet=settings.quiet,
            choices=settings.label_words)
        out.update(exact_match=metrics["exact_match"], em_rows=len(rows),
                   generated_tokens_mean=metrics["generated_tokens_mean"],
                   samples=[{k: r[k] for k in ("prompt", "reference", "generated", "answer", "reference_answer", "correct")}
                            for r in records[: options.samples]])
    if general is not None:
        out["general_loss"] = evaluate(model, general, "causal-lm", tokenizer.pad_token_id, settings.eval_batch_size)["loss"]
    return out


def _load(settings: RunSettings, adapter: Path | None) -> tuple[Any, Any]:
    from .train.inference import load_for_inference

    model, tokenizer, _, _ = load_for_inference(settings.model, adapter, "causal-lm", None, settings.seed)
    return model, tokenizer


def base_row(settings: RunSettings, options: LmOptions, out: Path) -> dict[str, Any]:
    """The base model's row (cached in ``out/base.json``): no training, forgetting 0 by definition."""
    from .train.run import count, peak_rss_bytes

    key = cache_key(settings, options)
    cached = _read_cached(out / BASE_FILE, key)
    if cached is not None:
        return {**cached, "status": "reused"}
    print(f"== {BASE}: the base model, no training (held-out loss, exact match, general-text loss)", flush=True)
    model, tokenizer = _load(settings, None)
    split, data = heldout(settings, tokenizer)
    general = general_text(settings, options, tokenizer)
    measured = measure(model, tokenizer, settings, options, split, data, general, with_loss=True)
    _, total = count(model)
    row = {"method": BASE, "trainable_params": 0, "total_params": total, "trainable_pct": 0.0, "steps": 0,
           "train_time_s": 0.0, "s_per_step": 0.0, "tokens": 0, "tokens_per_s": None, "adapter_bytes": 0,
           "metric": "loss", "best_dev": None, "test_metric": measured.get("heldout_loss"), "lr": None,
           "forgetting": 0.0 if general is not None else None, **measured}
    row["peak_rss_bytes"] = peak_rss_bytes()  # this process has only loaded and evaluated the base so far
    del model
    gc.collect()
    _write_cached(out / BASE_FILE, key, row)
    return {**row, "status": "new"}


def run_row(settings: RunSettings, options: LmOptions, row: dict[str, Any], run_dir: Path, base: dict[str, Any],
            reuse: bool) -> dict[str, Any]:
    """A trained run's row: its record plus held-out loss, exact match and forgetting (cached in the run folder
    while the run is reused)."""
    key = cache_key(settings, options)
    extra = _read_cached(run_dir / RUN_EVAL_FILE, key) if reuse else None
    if extra is None:
        print(f"== {row['method']}: exact match on {options.em_rows} held-out rows"
              + (f", loss on {options.forgetting_rows} rows of {options.forgetting_data}" if options.forgetting_data else ""),
              flush=True)
        try:
            model, tokenizer = _load(settings, run_dir)
            split, data = heldout(settings, tokenizer)
            general = general_text(settings, options, tokenizer)
            extra = measure(model, tokenizer, settings, options, split, data, general, with_loss=False)
        except (DeltatuneError, RuntimeError, ValueError) as error:  # the run stays a row; the failure is said
            print(f"== {row['method']}: generation / forgetting failed: {error}", file=sys.stderr, flush=True)
            return {**row, "heldout_loss": (row.get("test") or row.get("dev") or {}).get("loss"),
                    "warnings": [*(row.get("warnings") or []), f"generation / forgetting failed: {error}"]}
        del model
        gc.collect()
        _write_cached(run_dir / RUN_EVAL_FILE, key, extra)
    split = extra["heldout_split"]
    loss = (row.get(split) or {}).get("loss")
    forgetting = None
    if extra.get("general_loss") is not None and base.get("general_loss") is not None:
        forgetting = extra["general_loss"] - base["general_loss"]
    tokens_per_s = row["tokens"] / row["train_time_s"] if row.get("train_time_s") else None
    return {**row, **extra, "heldout_loss": loss, "forgetting": forgetting, "tokens_per_s": tokens_per_s}


def samples_markdown(rows: list[dict[str, Any]], limit: int = 400) -> list[str]:
    """``report.md`` lines: each sample prompt, its reference, and every row's generation (cut to ``limit`` chars)."""
    with_samples = [r for r in rows if r.get("samples")]
    if not with_samples:
        return []

    def quote(text: str) -> str:
        text = text if len(text) <= limit else text[:limit] + " ..."
        return "    " + text.replace("\n", "\n    ")

    lines = ["## sample generations (greedy)", ""]
    for i, sample in enumerate(with_samples[0]["samples"]):
        lines += [f"### held-out row {i}", "", "prompt:", "", quote(sample["prompt"]), "", "reference:", "",
                  quote(sample["reference"]), ""]
        for r in with_samples:
            if i < len(r["samples"]):
                got = r["samples"][i]
                mark = "correct" if got["correct"] else f"answer {got['answer']!r}"
                lines += [f"**{r['method']}** ({mark}):", "", quote(got["generated"]), ""]
    return lines


def explain_failure(code: int, reason: str | None) -> tuple[str, str]:
    """(status, one-line reason) of a run whose process failed: exit 2 is a method that cannot apply (a config
    error), anything else a run that broke."""
    status = "n/a" if code == 2 else "failed"
    reason = (reason or f"exit {code}").strip()
    for prefix in ("deltatune train: error: ", "deltatune train: "):
        reason = reason[len(prefix):] if reason.startswith(prefix) else reason
    return status, reason


def torch_threads(settings: RunSettings) -> None:
    if settings.threads:
        torch.set_num_threads(settings.threads)


__all__ = ["LmOptions", "base_row", "run_row", "samples_markdown", "explain_failure", "torch_threads"]
