"""Results tables for docs/RESULTS.md: many methods on real data with the bundled MiniLM, through the real CLI.

  python benchmarks/exp_tables.py glue     # SST-2, RTE, CoLA dev: full FT, LoRA, DoRA, MoRA, AsyLoRA, prefix, Houlsby
  python benchmarks/exp_tables.py imdb     # the "LoRA from scratch" IMDb table: baselines and 10 PEFT methods
  python benchmarks/exp_tables.py headlr   # SST-2: adapter methods with and without --head-lr 3e-2, prefix lr sweep

Every row is one ``deltatune train`` run in its own process and run folder under ``--runs`` (default
``runs/results``). A finished run is reused and an interrupted one resumed (``--resume``), so a table can be
completed over several sittings: re-run the same command. Writes ``benchmarks/results/results_<suite>.json`` and a
Markdown table next to it, and a metric-vs-trainable-parameters plot to ``docs/img/results_<suite>.png``.

IMDb has no dev split, so a seeded 1,000-row dev split is carved out of its training set (written under
``--runs``; never into the repo); models are picked on that dev split and reported on a seeded subset of the
official test split.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from results_io import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMAGES = ROOT / "docs" / "img"
SHARED = ROOT.parent / "shared" / "data"
# q,v plus both FFN projections (BERT: intermediate.dense and the block's output.dense, not attention.output.dense)
QV_FFN = r".*\.(query|value)|.*\.intermediate\.dense|.*\.layer\.\d+\.output\.dense"


@dataclass(frozen=True)
class Entry:
    """One row: a display name, the CLI method and its extra options (learning rates are the CLI's defaults unless
    given here; the only ones chosen by a search are those of the ``headlr`` suite, on SST-2 dev)."""

    name: str
    method: str
    options: tuple[str, ...] = ()


@dataclass
class Task:
    name: str
    data: Path
    metric: str
    options: tuple[str, ...] = ()
    entries: list[Entry] = field(default_factory=list)


PEFT_GLUE = [
    Entry("full", "full"),
    Entry("lora", "lora"),
    Entry("dora", "dora"),
    Entry("mora", "mora"),
    Entry("asylora", "asylora"),
    Entry("prefix", "prefix", ("--lr", "1e-2")),
    Entry("houlsby", "houlsby"),
]

# The fresh classifier reads MiniLM's small pooled output and wants a ~10x higher lr than an adapter (the
# ``headlr`` suite measures this on SST-2); adapter rows of the IMDb table give it its own group at 3e-2.
HEAD = ("--head-lr", "3e-2")
IMDB_ENTRIES = [
    Entry("head", "head"),
    Entry("last-2-layers", "last-layers", ("--k", "2")),
    Entry("full", "full"),
    Entry("lora-qv-r8", "lora", HEAD),
    Entry("lora-qv-ffn-r8", "lora", ("--targets", QV_FFN, *HEAD)),
    Entry("dora-qv-r8", "dora", HEAD),
    Entry("asylora-qv-r8", "asylora", HEAD),
    Entry("lora+-qv-r8", "lora", ("--loraplus-ratio", "16", *HEAD)),
    Entry("mora-qv", "mora", HEAD),
    Entry("prompt-20", "prompt", ("--num-virtual-tokens", "20", "--lr", "3e-2", *HEAD)),
    Entry("prefix-20", "prefix", ("--num-virtual-tokens", "20", "--lr", "1e-3", *HEAD)),
    Entry("ptuning-v2-20", "ptuning-v2", ("--num-virtual-tokens", "20", "--lr", "1e-2", *HEAD)),
    Entry("houlsby", "houlsby", HEAD),
]

HEAD_LR_ENTRIES = [
    entry
    for name, method, options in [
        ("lora", "lora", ()),
        ("asylora", "asylora", ()),
        ("houlsby", "houlsby", ()),
        ("prompt-20-lr3e-2", "prompt", ("--num-virtual-tokens", "20", "--lr", "3e-2")),
        ("prefix-lr1e-2", "prefix", ("--lr", "1e-2")),
        ("prefix-lr3e-3", "prefix", ("--lr", "3e-3")),
        ("prefix-lr1e-3", "prefix", ("--lr", "1e-3")),
        ("prefix-lr3e-4", "prefix", ("--lr", "3e-4")),
        ("ptuning-v2-lr1e-2", "ptuning-v2", ("--lr", "1e-2")),
        ("ptuning-v2-lr1e-3", "ptuning-v2", ("--lr", "1e-3")),
    ]
    for entry in (Entry(name, method, options), Entry(f"{name}-head3e-2", method, (*options, *HEAD)))
]


def suites(imdb_data: Path) -> dict[str, list[Task]]:
    common = ("--max-length", "128")
    return {
        "glue": [
            Task("sst2", SHARED / "sst2", "accuracy", (*common, "--max-train", "4000"), PEFT_GLUE),
            Task("rte", SHARED / "rte", "accuracy", (*common, "--epochs", "3"), PEFT_GLUE),
            Task("cola", SHARED / "cola", "mcc", (*common, "--max-train", "4000", "--epochs", "2", "--metric", "mcc"), PEFT_GLUE),
        ],
        "headlr": [
            Task("sst2", SHARED / "sst2", "accuracy", (*common, "--max-train", "4000"), HEAD_LR_ENTRIES),
            Task("cola", SHARED / "cola", "mcc", (*common, "--max-train", "4000", "--epochs", "2", "--metric", "mcc"),
                 [e for e in HEAD_LR_ENTRIES if e.name.startswith(("lora", "houlsby", "prefix-lr1e-3"))]),
        ],
        "imdb": [
            Task("imdb", imdb_data, "accuracy",
                 ("--max-length", "256", "--max-train", "2000", "--max-eval", "2000"), IMDB_ENTRIES),
        ],
    }


def imdb_with_dev(runs: Path, dev_rows: int = 1000, seed: int = 0) -> Path:
    """A copy of IMDb with a seeded ``dev_rows``-row dev split taken out of train (test untouched)."""
    folder = runs / "data" / "imdb"
    if (folder / "dev.jsonl.gz").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(SHARED / "imdb" / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        train = [line for line in f.read().split("\n") if line]  # not splitlines(): reviews hold U+2028 / U+0085
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    dev = set(order[:dev_rows])
    for name, rows in (("train", [r for i, r in enumerate(train) if i not in dev]), ("dev", [train[i] for i in sorted(dev)])):
        tmp = folder / f".{name}.jsonl.gz.tmp"
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            f.write("\n".join(rows) + "\n")
        os.replace(tmp, folder / f"{name}.jsonl.gz")
    test = folder / "test.jsonl.gz"
    if not test.exists():
        test.symlink_to(SHARED / "imdb" / "test.jsonl.gz")
    return folder


def run_entry(task: Task, entry: Entry, runs: Path, seed: int) -> dict:
    """Train (or reuse / resume) one run and return its table row."""
    out = runs / task.name / entry.name
    cmd = [sys.executable, "-m", "deltatune", "train", "--data", str(task.data), "--method", entry.method,
           "--seed", str(seed), *task.options, *entry.options, "--out", str(out)]
    if (out / "run.json").exists():
        cmd.append("--resume")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.time()
    done = subprocess.run(cmd, env=env, check=False, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    record = json.loads((out / "run.json").read_text())
    results = record["results"]
    dev = results.get("dev", {})
    test = results.get("test", {})
    return {
        "task": task.name, "name": entry.name, "method": entry.method, "options": list(entry.options),
        "command": " ".join(cmd[2:]), "lr": record.get("lr"), "trainable_params": results["trainable_params"],
        "trainable_pct": round(results["trainable_pct"], 4), "metric": task.metric,
        "dev": round(dev[task.metric], 4) if task.metric in dev else None,
        "test": round(test[task.metric], 4) if task.metric in test else None,
        "steps": results["steps"], "train_time_s": round(results["train_time_s"], 1),
        "s_per_step": round(results["s_per_step"], 3), "peak_rss_mib": round(results["peak_rss_bytes"] / 2**20, 1),
        "adapter_bytes": results["adapter_bytes"], "invocation_wall_s": round(time.time() - started, 1),
    }


def markdown(rows: list[dict]) -> str:
    head = "| task | method | trainable params | % | dev | test | metric | train time | s/step | peak RSS |\n"
    head += "|---|---|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['task']} | {r['name']} | {r['trainable_params']:,} | {r['trainable_pct']:.3f}% | "
        f"{'-' if r['dev'] is None else format(r['dev'], '.4f')} | {'-' if r['test'] is None else format(r['test'], '.4f')} | "
        f"{r['metric']} | {r['train_time_s']:.0f} s | {r['s_per_step']:.2f} | {r['peak_rss_mib']:.0f} MiB |\n"
        for r in rows
    )
    return head + body


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task]
        key = "test" if all(r["test"] is not None for r in mine) else "dev"
        for r in mine:
            ax.scatter(r["trainable_params"], r[key])
            ax.annotate(r["name"], (r["trainable_params"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(f"{key} {mine[0]['metric']}")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=["glue", "imdb", "headlr"])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="comma-separated entry names to run (default: all)")
    args = parser.parse_args()
    imdb = imdb_with_dev(args.runs) if args.suite == "imdb" else SHARED / "imdb"
    tasks = suites(imdb)[args.suite]
    output = RESULTS / f"results_{args.suite}.json"
    previous = json.loads(output.read_text())["rows"] if output.exists() else []
    rows: list[dict] = []
    for task in tasks:
        for entry in task.entries:
            if args.only and entry.name not in args.only.split(","):
                rows += [r for r in previous if r["task"] == task.name and r["name"] == entry.name]
                continue
            print(f"== {task.name} / {entry.name}", flush=True)
            rows.append(run_entry(task, entry, args.runs, args.seed))
            print(json.dumps(rows[-1]), flush=True)
            meta = {"suite": args.suite, "seed": args.seed, "model": "all-MiniLM-L6-v2 (bundled)",
                    "command": f"python benchmarks/exp_tables.py {args.suite}", "cpu_count": os.cpu_count(),
                    "load_average_at_write": os.getloadavg(),
                    "tasks": {t.name: {"data": str(t.data), "options": list(t.options)} for t in tasks}}
            write_json(output, {"meta": meta, "rows": rows})
    (RESULTS / f"results_{args.suite}.md").write_text(markdown(rows))
    if args.suite != "headlr":  # an ablation of pairs: the table says it, a params-vs-metric plot would not
        plot(rows, IMAGES / f"results_{args.suite}.png", f"{args.suite}: MiniLM, metric vs trainable parameters")
    print(markdown(rows))


if __name__ == "__main__":
    main()
