"""Paired step timings of the causal-LM levers in one process: the same SmolLM2 LoRA model and batches, the
configurations alternated step by step (A B C .. C B A ..) so a shared machine's slow phases hit all alike.

A configuration toggles per-block checkpointing (``every``: 0 off, 1 every block, k every k-th block) and the loss
(fused chunked head + CE, or full logits). Per configuration: median forward / backward / step seconds and the bytes
the forward leaves for backward (``benchmarks/saved_bytes.py``; not under checkpointing, where reading a saved
tensor runs the checkpoint's unpack hook, a recompute: compare peak RSS across processes there). No optimizer
step: every configuration sees the same weights.

    .venv/bin/python benchmarks/ab_llm_step.py --batch 4 --steps 3 --configs plain,fused,fused+ckpt1,fused+ckpt2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "ab_llm_step.json"


def parse(config: str) -> tuple[bool, int]:
    """'fused+ckpt2' -> (fused, every=2); 'plain' -> (False, 0)."""
    parts = config.split("+")
    every = next((int(p[4:] or 1) for p in parts if p.startswith("ckpt")), 0)
    return "fused" in parts, every


def set_checkpointing(hf, every: int) -> None:
    from deltatune.train.lm_fast import enable_checkpointing

    if every:
        enable_checkpointing(hf, every)
    else:
        hf.gradient_checkpointing_disable()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default="plain,fused,fused+ckpt1,fused+ckpt2")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    import torch
    from profile_llm_step import build
    from saved_bytes import saved_tensor_bytes

    from deltatune.train.lm_fast import loss_function
    from deltatune.train.models import unwrap_hf

    args.worker = "before"
    model, plain_loss, batches, _ = build(args, "before", batches=args.steps + 1)
    hf = unwrap_hf(model)
    fused_loss = loss_function(model, hf, "causal-lm", True, False)
    configs = args.configs.split(",")
    rows = {c: {"forward_s": [], "backward_s": [], "saved_mb": []} for c in configs}
    load_before = os.getloadavg()
    for number, batch in enumerate(batches):
        for config in configs if number % 2 == 0 else configs[::-1]:
            fused, every = parse(config)
            set_checkpointing(hf, every)
            began = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = (fused_loss if fused else plain_loss)(batch)
            middle = time.perf_counter()
            saved = saved_tensor_bytes(loss) if not every else float("nan")  # reading would unpack (recompute)
            resumed = time.perf_counter()
            loss.backward()
            done = time.perf_counter()
            model.zero_grad(set_to_none=True)
            if number:  # the first batch warms up
                rows[config]["forward_s"].append(middle - began)
                rows[config]["backward_s"].append(done - resumed)
                rows[config]["saved_mb"].append(saved / 1e6)
            print(f"batch {number} {config:14s} fwd {middle - began:6.2f} s bwd {done - resumed:6.2f} s "
                  f"saved {saved / 1e6:7.1f} MB loss {loss.item():.5f} shape {list(batch['input_ids'].shape)}", flush=True)
    summary = {c: {k: round(statistics.median(v), 3) for k, v in r.items()} for c, r in rows.items()}
    for values in summary.values():
        values["step_s"] = round(values["forward_s"] + values["backward_s"], 3)
    from results_io import write_json

    write_json(Path(args.out), {"settings": vars(args), "load_before": load_before, "load_after": os.getloadavg(),
                                "summary": summary, "runs": rows})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
