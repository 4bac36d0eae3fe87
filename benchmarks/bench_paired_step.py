"""Training-step time of several variants in one process, step by step in turn: paired ratios to the floor.

``bench_train_step.py`` runs each variant in its own process, which is what peak RSS needs, but on a shared
(virtual) machine the speed of a core drifts by 5-20% over minutes, so two processes a few minutes apart can
disagree by more than the differences being measured. Here every variant is built in one process and the steps
go round-robin (the order rotates each round: A B C, B C A, C A B, ...), so each round's steps see the same
machine within seconds. Reported per variant, for CPU time and for wall time: the median per step, and the
median over rounds of the ratio to that round's floor step (the paired ratio). With one thread the two agree;
with more, wall time is the measure (CPU time then also counts threads waiting for each other). Memory figures
come from ``bench_train_step.py``.

    .venv/bin/python benchmarks/bench_paired_step.py --rounds 20   # MiniLM 32x128: floor, d0.1, d0
    .venv/bin/python benchmarks/bench_paired_step.py --variants floor,dt-lora-r8-all-d0.1,peft-lora-r8-all-d0.1
    .venv/bin/python benchmarks/bench_paired_step.py --threads 2 --out results/bench_paired_step_2threads.json
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train_step import FULL_SIZES as SIZES  # noqa: E402
from bench_train_step import build, machine_info, make_step  # noqa: E402
from results_io import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_paired_step.json"


def paired(variants: list[str], model_name: str, rounds: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """``{"cpu": .., "wall": .., "faults": ..}``: seconds (and minor page faults) per step for each variant and
    round, steps taken round-robin in a rotating order."""
    from tqdm import tqdm

    batch, seq = SIZES[model_name]
    steps = {}
    for variant in variants:
        model, params = build(model_name, variant)
        steps[variant] = make_step(model.train(), params, batch, seq)
        for _ in range(warmup):
            steps[variant]()
    times: dict[str, dict[str, list[float]]] = {m: {v: [] for v in variants} for m in ("cpu", "wall", "faults")}
    for round_index in tqdm(range(rounds), desc=f"{model_name} rounds", file=sys.stderr):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start, start_wall = time.process_time(), time.perf_counter()
            steps[variant]()
            times["wall"][variant].append(time.perf_counter() - start_wall)
            times["cpu"][variant].append(time.process_time() - start)
            times["faults"][variant].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    return times


def summary(times: dict[str, dict[str, list[float]]]) -> dict:
    """Per variant and measure (cpu, wall, faults): the median per step, and the paired ratios to the floor and
    to PEFT."""
    result: dict[str, dict] = {}
    for measure, per_variant in times.items():
        floor = per_variant.get("floor")
        for variant, steps in per_variant.items():
            entry = result.setdefault(variant, {})
            if measure == "faults":  # counts, no ratios (a step may take none)
                entry["median_faults"], entry["faults"] = statistics.median(steps), steps
                continue
            entry[f"median_{measure}_s"], entry[f"{measure}_s"] = statistics.median(steps), steps
            if floor is not None and variant != "floor":
                per_round = [t / f for t, f in zip(steps, floor)]
                entry[f"paired_{measure}_over_floor"] = statistics.median(per_round)
                if len(per_round) > 1:
                    entry[f"paired_{measure}_over_floor_quartiles"] = statistics.quantiles(per_round, n=4)
            peft = variant.replace("dt-", "peft-", 1)
            if variant.startswith("dt-") and peft in per_variant:
                entry[f"paired_{measure}_over_peft"] = statistics.median(
                    t / q for t, q in zip(steps, per_variant[peft]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm", choices=sorted(SIZES))
    parser.add_argument("--variants", default="floor,dt-lora-r8-all-d0.1,dt-lora-r8-all-d0")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()
    times = paired(args.variants.split(","), args.model, args.rounds, args.warmup)
    batch, seq = SIZES[args.model]
    report = {"benchmark": "training step, variants interleaved in one process", "command": " ".join(sys.argv),
              "model": args.model, "batch": batch, "seq": seq, "threads": args.threads, "rounds": args.rounds,
              "machine": {**machine_info(), "loadavg_at_start": load_before, "loadavg_at_end": os.getloadavg()},
              "variants": summary(times)}
    write_json(args.out, report)
    for variant, entry in report["variants"].items():
        line = f"{variant:28s}"
        for measure in ("cpu", "wall"):
            line += f"  {measure} {entry[f'median_{measure}_s']:.3f} s/step"
            for ref in ("floor", "peft"):
                if f"paired_{measure}_over_{ref}" in entry:
                    line += f" (/ {ref} {entry[f'paired_{measure}_over_{ref}']:.3f})"
        print(line + f"  minor faults {entry['median_faults']:.0f}/step")


if __name__ == "__main__":
    main()
