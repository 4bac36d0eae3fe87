"""Side-by-side runs: the same model, data, budget and seed for each method, one subprocess per run (so peak RSS
is per method), finished runs reused and interrupted ones resumed when the command is run again."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from .compare_adapters import adapter_rows
from .errors import ConfigError, DeltatuneError
from .report import format_table, plot_compare, report_markdown
from .train.artifacts import CHECKPOINT, atomic_write
from .train.options import BASELINES, build_configs, method_parts, option_applies
from .train.preflight import check_compare_folder, clean_leftovers
from .train.run import read_run
from .train.settings import RunSettings


class CompareError(DeltatuneError, RuntimeError):
    """One or more runs of a comparison failed."""


def method_settings(base: RunSettings, methods: list[str], out: Path) -> dict[str, RunSettings]:
    """Per-method settings: options go to the methods (or stacks, ``lora+prefix``) that have them, ``PART.FIELD``
    options to the entries holding that part; each option must fit at least one entry."""
    parts = {method: method_parts(method) for method in methods}
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods lists a method twice: {','.join(methods)}")
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
        if method in peft:
            options = {k: v for k, v in base.method_options.items() if option_applies(k, parts[method])}
            build_configs(method, options, base.config_values if method == base.method else None)  # fail early
        plans[method] = dataclasses.replace(
            base, method=method, method_options=options, out=str(out / method),
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
        code = subprocess.call(command)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    if code == 130:
        raise KeyboardInterrupt
    record = read_run(run_dir)
    if code != 0 or record is None or record.get("status") != "done":
        return None, f"failed (exit {code})"
    return record, "resumed" if resume else "new"


def histories(out: Path, methods: list[str]) -> dict[str, list[dict[str, Any]]]:
    found = {}
    for method in methods:
        path = out / method / "metrics.jsonl"
        if path.is_file():
            found[method] = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return found


def compare(
    base: RunSettings, methods: list[str], out: Path, debug: bool = False, adapters: dict[str, Path] | None = None
) -> dict[str, Any]:
    """Run every method (and evaluate the ``adapters`` folders as rows, see ``compare_adapters``) and write
    ``results.json``, ``report.md``, ``metric_vs_params.png``, ``loss_curves.png``."""
    out = Path(out)
    plans = method_settings(base, methods, out)
    check_compare_folder(out, read_run)
    out.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    results, failures = [], []
    for method, settings in plans.items():
        print(f"== {method} ({settings.out})", flush=True)
        record, how = run_one(settings, debug)
        if record is None:
            failures.append(f"{method}: {how}")
            print(f"== {method}: {how}", flush=True)
            continue
        print(f"== {method}: {how}", flush=True)
        results.append({**record["results"], "lr": record.get("lr"), "status": how})
    results += adapter_rows(base, adapters or {})
    metric = results[0]["metric"] if results else (base.metric or "accuracy")
    summary = {"settings": base.to_dict(), "methods": methods, "metric": metric, "results": results, "failures": failures,
               "adapters": {name: str(folder) for name, folder in (adapters or {}).items()}}
    text = json.dumps(summary, indent=2, default=str) + "\n"
    atomic_write(out / "results.json", lambda p: Path(p).write_text(text, encoding="utf-8"))
    plots = plot_compare(results, histories(out, [r["method"] for r in results]), out, metric) if results else []
    report = report_markdown(results, base.to_dict(), metric, plots)
    atomic_write(out / "report.md", lambda p: Path(p).write_text(report, encoding="utf-8"))
    print()
    print(format_table(results, metric))
    for row in results:
        for warning in row.get("warnings") or []:
            print(f"warning: {row['method']}: {warning}", flush=True)
    print(f"\nwrote {out / 'results.json'}, {out / 'report.md'} and plots")
    if failures:
        raise CompareError(f"{len(failures)} run(s) failed: {'; '.join(failures)}; their logs are above")
    return summary
