"""Markdown tables (for docs/BENCHMARKS.md) from the suite's JSON results; prints to stdout.

    .venv/bin/python benchmarks/summarise.py                       # every bench_train_step*.json + inference
    .venv/bin/python benchmarks/summarise.py --log run.log         # also rows a run printed (no JSON yet)
    .venv/bin/python benchmarks/summarise.py --log run.log --save results/x.json   # and keep them as JSON
    .venv/bin/python benchmarks/summarise.py --time wall results/a.json    # tables for these files only

Times are medians over processes of each process's median step (CPU = process time, wall = elapsed).
Ratios are computed here from those medians, from CPU time by default (robust when the machine is shared by
1-thread processes) or from wall time with ``--time wall`` (the measure for multi-thread runs on an idle
machine); nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROW = re.compile(r"(\w+) round (\d+) (\S+): ([\d.]+)s \(cpu ([\d.]+)s\), peak (\d+) MB, saved (\d+) MB, load ([\d.]+)")


def from_json(path: Path) -> dict[str, dict]:
    """model -> {"batch", "seq", "summary", "profile"} from a bench_train_step JSON."""
    data = json.loads(path.read_text())
    return {m: {"batch": e["batch"], "seq": e["seq"], "summary": e.get("summary", {}), "profile": e.get("profile", {}),
                "rounds": len(next(iter(e["runs"].values()))) if "runs" in e else 0}
            for m, e in data.get("models", {}).items()}


def from_log(path: Path) -> dict[str, dict]:
    """The same summaries from the per-process rows a run printed (median over the printed rounds)."""
    rows: dict[str, dict[str, list]] = {}
    for line in path.read_text().splitlines():
        match = ROW.match(line)
        if match:
            model, _, variant, wall, cpu, peak, saved, load = match.groups()
            rows.setdefault(model, {}).setdefault(variant, []).append(
                (float(wall), float(cpu), float(peak), float(saved), float(load)))
    out = {}
    for model, variants in rows.items():
        summary = {v: {"median_step_s": statistics.median(r[0] for r in rs),
                       "median_cpu_s": statistics.median(r[1] for r in rs),
                       "peak_rss_mb": statistics.median(r[2] for r in rs), "saved_for_backward_mb": rs[0][3],
                       "loadavg": statistics.median(r[4] for r in rs), "n": len(rs)} for v, rs in variants.items()}
        out[model] = {"batch": None, "seq": None, "summary": summary, "profile": {},
                      "rounds": max(s["n"] for s in summary.values())}
    return out


TIME_KEYS = {"cpu": "median_cpu_s", "wall": "median_step_s"}


def train_tables(model: str, entry: dict, measure: str = "cpu") -> str:
    summary = entry["summary"]
    floor, full = summary.get("floor"), summary.get("full")
    key, name_t = TIME_KEYS[measure], "wall" if measure == "wall" else "CPU"
    lines = [f"### {model}" + (f", batch {entry['batch']} x {entry['seq']}" if entry["batch"] else "")
             + f" ({entry['rounds']} round(s))", "",
             f"| variant | CPU s/step | wall s/step | peak RSS MB | saved for bwd MB | {name_t} / floor | RSS / floor"
             f" | {name_t} / PEFT | RSS / PEFT | {name_t} / full FT | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        peft = summary.get(name.replace("dt-", "peft-", 1)) if name.startswith("dt-") else None

        def ratio(ref: dict | None, key: str, s: dict = s) -> str:
            return f"{s[key] / ref[key]:.2f}" if ref is not None and ref is not s else ""

        lines.append(f"| {name} | {s['median_cpu_s']:.3f} | {s['median_step_s']:.3f} | {s['peak_rss_mb']:.0f} | "
                     f"{s['saved_for_backward_mb']:.0f} | {ratio(floor, key)} | {ratio(floor, 'peak_rss_mb')}"
                     f" | {ratio(peft, key)} | {ratio(peft, 'peak_rss_mb')} | {ratio(full, key)}"
                     f" | {s['loadavg']:.1f} |")
    for name, s in summary.items():
        lora = summary.get(name.replace("dora", "lora"))
        if name.startswith("dt-dora") and lora is not None:
            lines.append(f"\n{name} / {name.replace('dora', 'lora')}: CPU {s['median_cpu_s'] / lora['median_cpu_s']:.2f}, "
                         f"wall {s['median_step_s'] / lora['median_step_s']:.2f}, "
                         f"peak RSS {s['peak_rss_mb'] / lora['peak_rss_mb']:.2f}")
    for variant, rows in entry["profile"].items():
        lines += ["", f"Profile {variant} (torch.profiler self CPU time per step, top ops):", "",
                  "| op | ms/step | share | calls/step |", "|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['self_cpu_ms_per_step']:.0f} | {100 * r['share']:.1f}% | {r['calls_per_step']:.0f} |"
                  for r in rows[:10]]
    return "\n".join(lines)


def inference_table(path: Path) -> str:
    data = json.loads(path.read_text())
    lines = [f"### inference ({data['command']})", "", "| shape | unmerged / base | merged / base | PEFT unmerged / base"
             " | base CPU s | merged-vs-unmerged max abs diff |", "|---|---|---|---|---|---|"]
    for shape, e in data["shapes"].items():
        r = e["ratios_to_base"]
        lines.append(f"| {shape} | {r['unmerged']['cpu']:.3f} | {r['merged']['cpu']:.3f} | {r['peft_unmerged']['cpu']:.3f}"
                     f" | {e['medians']['base']['median_cpu_s']:.4f} | {e['max_abs_diff_merged_vs_unmerged']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", type=Path, action="append", default=[])
    parser.add_argument("--save", type=Path, help="also write the summaries taken from --log files to this JSON")
    parser.add_argument("--time", choices=sorted(TIME_KEYS), default="cpu", help="which step time the ratios use")
    parser.add_argument("paths", type=Path, nargs="*", help="bench_train_step JSON files (default: all in results/)")
    args = parser.parse_args()
    if args.paths:
        print("\n\n".join(f"`{path.name}`\n\n" + train_tables(m, e, args.time)
                           for path in args.paths for m, e in from_json(path).items()))
        return
    models: dict[str, dict] = {}
    profiles: dict[str, dict] = {}
    for path in sorted(RESULTS.glob("bench_train_step*.json")):
        if not any(tag in path.name for tag in ("partial", "before", "rows")):
            for model, entry in from_json(path).items():
                if entry["summary"]:
                    models[model] = entry
                profiles.setdefault(model, {}).update(entry["profile"])
    logged = {}
    for path in args.log:
        entries = from_log(path)
        logged.update(entries)
        for model, entry in entries.items():
            models.setdefault(model, entry)
    if args.save:
        args.save.write_text(json.dumps({"source": [str(p) for p in args.log], "models": logged}, indent=1) + "\n")
    for model, profile in profiles.items():
        models.setdefault(model, {"batch": None, "seq": None, "summary": {}, "rounds": 0, "profile": {}})
        models[model]["profile"] = {**profile, **models[model]["profile"]}
    print("\n\n".join(train_tables(m, e, args.time) for m, e in models.items()))
    if (RESULTS / "bench_inference.json").exists():
        print("\n" + inference_table(RESULTS / "bench_inference.json"))


if __name__ == "__main__":
    main()
