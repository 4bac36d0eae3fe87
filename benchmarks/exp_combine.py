"""Combining two task adapters: does each combination type keep both tasks? (docs/RESULTS.md, section 6)

  python benchmarks/exp_combine.py [--runs runs/combine]

Trains (or reuses) two LoRA adapters on the bundled MiniLM with ``deltatune train``: SST-2 (short movie-review
phrases) and IMDb (long reviews; no dev split, so models are picked and reported on seeded test subsets). Then,
for every combination type, builds the combination of the two with ``DeltaModel.add_weighted_adapter`` (weights
1, 1; rank 8 for the SVD types; density 0.5 where the type takes one; the non-svd names build the same adapters
as their ``*_svd`` twins, so only the twins are run), once with each adapter's classification
head, and evaluates it with ``deltatune eval`` on that head's task. "sst2 only" / "imdb only" rows are the inputs
themselves (weights 1,0 and 0,1, with the evaluated task's head). Writes benchmarks/results/combine.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

from results_io import write_json

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TASKS = {  # name -> (data folder, eval split, options shared by train and eval, training subset)
    "sst2": (SHARED / "sst2", "dev", ["--max-eval", "872"], "4000"),
    "imdb": (SHARED / "imdb", "test", ["--max-eval", "300"], "2000"),
}
TRAIN = ["--method", "lora", "--r", "8", "--alpha", "16", "--targets", "query,value", "--epochs", "1",
         "--max-length", "128", "--seed", "0", "--quiet"]
# deltatune's ``linear``/``ties``/``dare_linear``/``dare_ties``/``magnitude_prune`` build the same adapter as their
# ``*_svd`` twins (same rank, same seed): every type is defined on the dense dW_i. Only the twins are evaluated.
TYPES = ["cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]


def cli(argv: list[str]) -> str:
    """Run ``deltatune ARGV`` in this process; its stdout."""
    from deltatune.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"deltatune {' '.join(argv)} failed with exit code {code}")
    return out.getvalue()


def train(runs: Path) -> dict[str, Path]:
    folders = {}
    for task, (data, _, options, rows) in TASKS.items():
        folders[task] = runs / task
        if not (folders[task] / "adapter_model.safetensors").is_file():
            cli(["train", "--data", str(data), *TRAIN, "--max-train", rows, *options, "--out", str(folders[task])])
    return folders


def combinations(folders: dict[str, Path], runs: Path) -> list[dict]:
    """Every (row, head) combination written to a folder, with its achieved relative error."""
    import deltatune as dt
    from deltatune.train.inference import artifact_info, load_for_inference

    info = artifact_info(folders["sst2"])
    model, _, _, _ = load_for_inference(info["model"], None, info["task"], info["labels"])
    for task, folder in folders.items():
        model = dt.load(model, folder, name=task)
    rows = [("sst2 only", "cat", [1.0, 0.0]), ("imdb only", "cat", [0.0, 1.0])] + [(t, t, [1.0, 1.0]) for t in TYPES]
    made = []
    for row, kind, weights in rows:
        for head in TASKS:
            name = f"{kind}_{head}_{int(weights[0])}{int(weights[1])}"
            density = 0.5 if any(k in kind for k in ("ties", "dare", "magnitude")) else None
            report = model.add_weighted_adapter(
                ["sst2", "imdb"], weights, name, kind, None if kind == "cat" else 8, density,
                modules_to_save_from=head,
            )
            model.save(runs / "combined" / name, adapter=name)
            model.delete_adapter(name)
            made.append({"row": row, "type": kind, "head": head, "folder": runs / "combined" / name,
                         "relative_error": report.relative_error, "max_rank": max(report.ranks.values())})
    return made


def evaluate(made: list[dict]) -> list[dict]:
    results = []
    for item in made:
        data, split, options, _ = TASKS[item["head"]]
        metrics = json.loads(cli(["eval", "--adapter", str(item["folder"]), "--data", str(data), "--split", split,
                                  "--max-length", "128", *options, "--json"]))[split]
        results.append({**{k: v for k, v in item.items() if k != "folder"}, "task": item["head"],
                        "accuracy": metrics["accuracy"]})
        print(f"{item['row']:>20} on {item['head']}: accuracy {metrics['accuracy']:.4f}  "
              f"(rank {item['max_rank']}, relative error {item['relative_error']:.3f})", flush=True)
    return results


def table(results: list[dict]) -> str:
    lines = ["| combination | rank | relative error of the rank-k representation | SST-2 dev acc | IMDb test acc |",
             "|---|---|---|---|---|"]
    by_row: dict[str, dict] = {}
    for r in results:
        by_row.setdefault(r["row"], {})[r["task"]] = r
    for row, cells in by_row.items():
        first = cells["sst2"]
        lines.append(f"| {row} | {first['max_rank']} | {first['relative_error']:.3f} | {cells['sst2']['accuracy']:.4f} "
                     f"| {cells['imdb']['accuracy']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/combine", help="folder for the runs and combined adapters")
    args = parser.parse_args()
    runs = Path(args.runs)
    start = time.time()
    folders = train(runs)
    results = evaluate(combinations(folders, runs))
    text = table(results)
    print(text)
    write_json(ROOT / "benchmarks" / "results" / "combine.json",
               {"command": "python benchmarks/exp_combine.py", "train_options": TRAIN, "results": results,
                "table": text, "seconds": round(time.time() - start)})


if __name__ == "__main__":
    main()
