"""Training-step time of several variants in one process, step by step in turn: paired ratios to the floor.

``bench_train_step.py`` runs each variant in its own process, which is what peak RSS needs, but on a shared
(virtual) machine the speed of a core drifts by 5-10% over minutes, so two processes a few minutes apart can
disagree by more than the differences being measured. Here every variant is built in one process and the steps
go round-robin (the order rotates each round: A B C, B C A, C A B, ...), so each round's steps see the same
machine within seconds. Reported per variant: median CPU time per step, and the median over rounds of the
ratio to that round's floor step (the paired ratio). Memory figures come from ``bench_train_step.py``.

    .venv/bin/python benchmarks/bench_paired_step.py --rounds 20   # MiniLM 32x128: floor, d0.1, d0
    .venv/bin/python benchmarks/bench_paired_step.py --variants floor,dt-lora-r8-all-d0.1,peft-lora-r8-all-d0.1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train_step import FULL_SIZES as SIZES  # noqa: E402
from bench_train_step import build, machine_info, make_step  # noqa: E402
from results_io import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_paired_step.json"


def paired(variants: list[str], model_name: str, rounds: int, warmup: int) -> dict:
    """CPU seconds per step for each variant and round, steps taken round-robin in a rotating order."""
    from tqdm import tqdm

    batch, seq = SIZES[model_name]
    steps = {}
    for variant in variants:
        model, params = build(model_name, variant)
        steps[variant] = make_step(model.train(), params, batch, seq)
        for _ in range(warmup):
            steps[variant]()
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for round_index in tqdm(range(rounds), desc=f"{model_name} rounds", file=sys.stderr):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            start = time.process_time()
            steps[variant]()
            cpu[variant].append(time.process_time() - start)
    return cpu


def summary(cpu: dict[str, list[float]]) -> dict:
    floor = cpu.get("floor")
    result = {}
    for variant, times in cpu.items():
        entry = {"median_cpu_s": statistics.median(times), "cpu_s": times}
        if floor is not None and variant != "floor":
            per_round = [t / f for t, f in zip(times, floor)]
            entry["paired_cpu_over_floor"] = statistics.median(per_round)
            if len(per_round) > 1:
                entry["paired_cpu_over_floor_quartiles"] = statistics.quantiles(per_round, n=4)
        result[variant] = entry
    for variant in cpu:
        peft = variant.replace("dt-", "peft-", 1)
        if variant.startswith("dt-") and peft in cpu:
            result[variant]["paired_cpu_over_peft"] = statistics.median(
                t / q for t, q in zip(cpu[variant], cpu[peft]))
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
    cpu = paired(args.variants.split(","), args.model, args.rounds, args.warmup)
    batch, seq = SIZES[args.model]
    report = {"benchmark": "training step, variants interleaved in one process", "command": " ".join(sys.argv),
              "model": args.model, "batch": batch, "seq": seq, "threads": args.threads, "rounds": args.rounds,
              "machine": {**machine_info(), "loadavg_at_start": load_before, "loadavg_at_end": os.getloadavg()},
              "variants": summary(cpu)}
    write_json(args.out, report)
    for variant, entry in report["variants"].items():
        ratio = entry.get("paired_cpu_over_floor")
        print(f"{variant:28s} cpu {entry['median_cpu_s']:.3f} s/step"
              + ("" if ratio is None else f"   paired / floor {ratio:.3f}")
              + (f"   paired / peft {entry['paired_cpu_over_peft']:.3f}" if "paired_cpu_over_peft" in entry else ""))


if __name__ == "__main__":
    main()
