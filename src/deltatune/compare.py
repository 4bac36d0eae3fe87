"""Side-by-side runs: the same model, data, budget and seed for each method, one subprocess per run (so peak RSS
is per method), finished runs reused and interrupted ones resumed when the command is run again.

An entry that cannot apply (its run stops with a configuration error) or whose run fails gets a row with the
one-line reason instead of numbers. ``qlora`` is LoRA over an NF4-quantized base (``--quantize nf4`` for that entry).
Causal-LM comparisons add the base model's row and generation / forgetting columns (``deltatune.compare_lm``)."""

from __future__ import annotations

import codecs
import dataclasses
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from .compare_adapters import adapter_rows
from .compare_lm import LmOptions, base_row, explain_failure, run_row, samples_markdown, torch_threads
from .errors import ConfigError, DeltatuneError
from .report import format_table, plot_compare, report_markdown
from .train.artifacts import CHECKPOINT, atomic_write
from .train.options import BASELINES, build_configs, method_parts, option_applies
from .train.preflight import check_compare_folder, clean_leftovers
from .train.run import read_run
from .train.settings import RunSettings


class CompareError(DeltatuneError, RuntimeError):
    """One or more runs of a comparison failed."""


ALIASES = {"qlora": ("lora", "nf4")}  # entry -> (method, quantize)


def entry_method(entry: str) -> tuple[str, str | None]:
    """(method, quantize scheme or None) of a compare entry: ``qlora`` -> (``lora``, ``nf4``)."""
    return ALIASES.get(entry, (entry, None))


def method_settings(base: RunSettings, methods: list[str], out: Path) -> dict[str, RunSettings]:
    """Per-method settings: options go to the methods (or stacks, ``lora+prefix``) that have them, ``PART.FIELD``
    options to the entries holding that part; each option must fit at least one entry."""
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods lists a method twice: {','.join(methods)}")
    parts = {method: method_parts(entry_method(method)[0]) for method in methods}
    peft = [m for m in methods if m not in BASELINES]
    used = {key for m in peft for key in base.method_options if option_applies(key, parts[m])}
    unused = sorted(set(base.method_options) - used)
    if unused:
        raise ConfigError(
            f"options {', '.join('--' + u.replace('_', '-') for u in unused)} apply to none of the methods "
            f"{','.join(methods)}"
        )
    plans: dict[str, RunSettings] = {}
    for method in methods:
        options: dict[str, str] = {}
        name, quantize = entry_method(method)
        if method in peft:
            options = {k: v for k, v in base.method_options.items() if option_applies(k, parts[method])}
            build_configs(name, options, base.config_values if method == base.method else None)  # fail early
        plans[method] = dataclasses.replace(
            base, method=name, method_options=options, out=str(out / method), quantize=quantize or base.quantize,
            config_values=base.config_values if method == base.method else {}, resume=False,
        )
    return plans


def run_one(settings: RunSettings, debug: bool = False) -> tuple[dict[str, Any] | None, str]:
    """Reuse, resume or start one run in a subprocess; (run record, "reused" | "resumed" | "new")."""
    run_dir = Path(settings.out)
    previous = read_run(run_dir)
    same = previous is not None and RunSettings.from_dict(previous.get("settings", {})).identity() == settings.identity()
    if same and previous.get("status") == "done":
        return previous, "reused"
    resume = same and (run_dir / CHECKPOINT).is_file()
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.replace(settings, resume=resume)
    text = json.dumps(settings.to_dict(), indent=2) + "\n"
    atomic_write(run_dir / "settings.json", lambda p: Path(p).write_text(text, encoding="utf-8"))
    command = [sys.executable, "-m", "deltatune", "train", "--settings-file", str(run_dir / "settings.json"), "--overwrite"]
    if debug:
        command.append("--debug")
    previous_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child gets Ctrl-C and checkpoints
    try:
        code, last_error = call_teeing_stderr(command)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    if code == 130:
        raise KeyboardInterrupt
    record = read_run(run_dir)
    if code != 0 or record is None or record.get("status") != "done":
        status, reason = explain_failure(code or 1, last_error)
        return None, f"{status}: {reason}"
    return record, "resumed" if resume else "new"


def call_teeing_stderr(command: list[str]) -> tuple[int, str | None]:
    """Run ``command``, passing its stderr through as it comes; (exit code, its last ``error:`` line or None)."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    found: list[str] = []

    def pump() -> None:
        assert process.stderr is not None
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        tail = ""
        for chunk in iter(lambda: process.stderr.read1(4096), b""):  # type: ignore[union-attr]
            text = decoder.decode(chunk)
            sys.stderr.write(text)
            sys.stderr.flush()
            tail = (tail + text)[-16384:]
        lines = tail.replace("\r", "\n").split("\n")
        said = [line for line in lines if " error: " in line] or [line for line in lines if "Error: " in line]
        found.extend(said[-1:])  # the command's one-line error, else the exception line of a traceback

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    code = process.wait()
    reader.join()
    return code, found[0].strip() if found else None


def histories(out: Path, methods: list[str]) -> dict[str, list[dict[str, Any]]]:
    found = {}
    for method in methods:
        path = out / method / "metrics.jsonl"
        if path.is_file():
            found[method] = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return found


def is_causal_lm(settings: RunSettings) -> bool:
    """Whether the comparison trains causal LMs (``--task causal-lm``, or rows without labels under ``auto``)."""
    if settings.task != "auto":
        return settings.task == "causal-lm"
    from .train.data import Fields, detect_task, load_splits

    splits, _ = load_splits(settings.data)
    rows = splits.get("train") or next(iter(splits.values()), [])
    return detect_task(rows, Fields(**settings.fields)) == "causal-lm"


def compare(base: RunSettings, methods: list[str], out: Path, debug: bool = False, lm: LmOptions | None = None,
            adapters: dict[str, Path] | None = None) -> dict[str, Any]:
    """Run every method (and evaluate the ``adapters`` folders as rows, see ``compare_adapters``) and write
    ``results.json``, ``report.md``, ``metric_vs_params.png``, ``loss_curves.png``.

    A causal-LM comparison (``lm`` options, default ``LmOptions()``) starts with the base model's row."""
    out = Path(out)
    plans = method_settings(base, methods, out)
    check_compare_folder(out, read_run)
    causal = is_causal_lm(base)
    lm = (lm or LmOptions()) if causal else None
    out.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    torch_threads(base)
    results: list[dict[str, Any]] = [base_row(base, lm, out)] if lm is not None else []
    failures = []
    for method, settings in plans.items():
        print(f"== {method} ({settings.out})", flush=True)
        record, how = run_one(settings, debug)
        print(f"== {method}: {how}", flush=True)
        if record is None:
            status, _, reason = how.partition(": ")
            results.append({"method": method, "status": status, "reason": reason})
            if status != "n/a":
                failures.append(f"{method}: {how}")
            continue
        row = {**record["results"], "method": method, "lr": record.get("lr"), "status": how}
        if lm is not None:
            row = run_row(settings, lm, row, Path(settings.out), results[0], how == "reused")
        results.append(row)
    results += adapter_rows(base, adapters or {})
    summary = write_outputs(base, methods, out, results, failures, lm, adapters or {})
    if failures:
        raise CompareError(f"{len(failures)} run(s) failed: {'; '.join(failures)}; their logs are above")
    return summary


def write_outputs(base: RunSettings, methods: list[str], out: Path, results: list[dict[str, Any]], failures: list[str],
                  lm: LmOptions | None, adapters: dict[str, Path]) -> dict[str, Any]:
    """``results.json``, the plots and ``report.md``; print the table."""
    trained = [r for r in results if "trainable_params" in r]
    metric = "loss" if lm is not None else trained[0]["metric"] if trained else (base.metric or "accuracy")
    summary = {"settings": base.to_dict(), "methods": methods, "metric": metric, "results": results, "failures": failures,
               "adapters": {name: str(folder) for name, folder in adapters.items()}}
    if lm is not None:
        summary["lm"] = lm.to_dict()
    text = json.dumps(summary, indent=2, default=str) + "\n"
    atomic_write(out / "results.json", lambda p: Path(p).write_text(text, encoding="utf-8"))
    names = [r["method"] for r in trained]
    plots = plot_compare(trained, histories(out, names), out, metric) if trained else []
    extra = lm_report_lines(lm) + samples_markdown(results) if lm is not None else []
    report = report_markdown(results, base.to_dict(), metric, plots, extra)
    atomic_write(out / "report.md", lambda p: Path(p).write_text(report, encoding="utf-8"))
    print()
    print(format_table(results, metric))
    for row in results:
        for warning in row.get("warnings") or []:
            print(f"warning: {row['method']}: {warning}", flush=True)
    print(f"\nwrote {out / 'results.json'}, {out / 'report.md'} and plots")
    return summary


def lm_report_lines(lm: LmOptions) -> list[str]:
    forgetting = (f"loss on {lm.forgetting_rows} seeded rows of `{lm.forgetting_data}` minus the base model's"
                  if lm.forgetting_data else "not measured (pass --forgetting-data FOLDER of text rows)")
    return ["## how the causal-LM columns are measured", "",
            "- held-out loss: completion tokens of the held-out split (test, else dev), the run's own evaluation",
            f"- exact match: greedy decoding (at most {lm.max_new_tokens} new tokens) on the first {lm.em_rows} held-out "
            f"rows, answers by {('--answer-regex ' + repr(lm.answer_regex)) if lm.answer_regex else 'the number after the last ####, else the last number'}",
            f"- forgetting: {forgetting}", ""]
