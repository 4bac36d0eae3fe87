"""Time cost of rebuilding LoRA inputs in backward (``deltatune.ops.recompute``) instead of saving them.

MiniLM 32x128, LoRA r8 on all linears at dropout 0.1 and 0, each with the rebuild on and off, and the frozen
floor, all in one process with steps taken in turn (order rotated each round, as in ``bench_paired_step.py``).
The rebuild is switched off by replacing ``recompute.plan`` for that step only. Reports the median wall time per
step and the median per-round ratios (to the floor, and rebuild on / off). Its memory effect is in
``bench_train_step.py``'s "saved for bwd" and peak RSS.

    .venv/bin/python benchmarks/bench_rebuild_cost.py --rounds 10 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train_step import FULL_SIZES, build, machine_info, make_step  # noqa: E402
from results_io import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_rebuild_cost.json"
VARIANTS = ["floor", "dt-lora-r8-all-d0.1", "dt-lora-r8-all-d0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import torch
    from tqdm import tqdm

    from deltatune.ops import recompute

    torch.set_num_threads(args.threads)
    batch, seq = FULL_SIZES["minilm"]
    steps = {}
    for variant in VARIANTS:
        model, params = build("minilm", variant)
        steps[variant] = make_step(model.train(), params, batch, seq)
    rebuild_on, rebuild_off = recompute.plan, (lambda x: None)
    cases = [("floor", "floor", rebuild_on)] + [
        (f"{v} rebuild {state}", v, plan) for v in VARIANTS[1:] for state, plan in (("on", rebuild_on),
                                                                                     ("off", rebuild_off))]
    times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    try:
        for _, variant, plan in cases:  # warm-up
            recompute.plan = plan
            steps[variant]()
        for round_index in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
            shift = round_index % len(cases)
            for name, variant, plan in cases[shift:] + cases[:shift]:
                recompute.plan = plan
                start = time.perf_counter()
                steps[variant]()
                times[name].append(time.perf_counter() - start)
    finally:
        recompute.plan = rebuild_on

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    summary = {name: {"median_wall_s": statistics.median(t), "wall_s": t, "paired_over_floor": paired(name, "floor")}
               for name, t in times.items()}
    on_over_off = {v: paired(f"{v} rebuild on", f"{v} rebuild off") for v in VARIANTS[1:]}
    write_json(args.out, {"benchmark": "rebuild LoRA inputs in backward: time cost, paired in one process",
                          "command": " ".join(sys.argv), "batch": batch, "seq": seq, "threads": args.threads,
                          "rounds": args.rounds, "machine": machine_info(), "cases": summary,
                          "rebuild_on_over_off": on_over_off})
    for name, entry in summary.items():
        print(f"{name:32s} wall {entry['median_wall_s']:.3f} s/step  paired / floor {entry['paired_over_floor']:.3f}")
    for variant, ratio in on_over_off.items():
        print(f"{variant}: rebuild on / off {ratio:.3f}")


if __name__ == "__main__":
    main()
