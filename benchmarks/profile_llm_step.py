"""Where one SmolLM2 LoRA training step's time and bytes go, before (no levers) and after (default fast path).

One process per configuration; each builds the model as ``deltatune train`` does (LoRA r16 all-linear, dropout
0.05), takes one batch of GSM8K rows (chat template, completion-only labels), runs one warm-up step, then one
profiled step (torch.profiler, CPU): forward / backward / optimizer wall time, the ops with the most self CPU time,
and the bytes the forward leaves for backward (``benchmarks/saved_bytes.py``, distinct storages; checkpointed
blocks keep only their inputs) plus the peak RSS of the process.

    .venv/bin/python benchmarks/profile_llm_step.py --batch 4 --max-length 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {"before": {"fused_ce": False, "gradient_checkpointing": False}, "after": {}}
RESULTS = Path(__file__).resolve().parent / "results" / "profile_llm_step.json"


def build(args: argparse.Namespace, config: str, batches: int = 1):
    """(model, loss function of a batch, one batch (a list of ``batches`` when more than 1), optimizer) the way
    run_training builds them."""
    import tempfile

    import torch
    from bench_llm_sft import settings_for, train_only_data

    from deltatune.train.batching import collate, train_batches
    from deltatune.train.lm_fast import checkpointing_wanted, enable_checkpointing, loss_function
    from deltatune.train.models import load_model, load_tokenizer, prepare_method, resolve_model, unwrap_hf
    from deltatune.train.options import build_configs
    from deltatune.train.run import prepare_data

    torch.set_num_threads(args.threads)
    args.steps = batches
    settings = settings_for(args, train_only_data(Path(tempfile.mkdtemp()) / "data"), "unused", **CONFIGS[config])
    path = resolve_model("smollm2")
    tokenizer = load_tokenizer(path)
    data = prepare_data(settings, tokenizer).encoded["train"]
    model, _ = load_model(path, "causal-lm", pad_id=tokenizer.pad_token_id)
    model = prepare_method(model, "lora", build_configs("lora", settings.method_options), [], "causal-lm")
    if checkpointing_wanted(settings.gradient_checkpointing, "causal-lm"):
        enable_checkpointing(unwrap_hf(model))
    fused = loss_function(model, unwrap_hf(model), "causal-lm", settings.fused_ce, False)
    loss_of = fused or (lambda b: model(**b).loss)
    order = train_batches(data, args.batch, 0, 0)[:batches]
    batch = [collate(data, rows, tokenizer.pad_token_id, "causal-lm") for rows in order]
    batch = batch[0] if batches == 1 else batch
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    return model, loss_of, batch, optimizer


def step(loss_of, batch, optimizer, read_saved: bool = True) -> dict:
    """One optimizer step, timed by phase. ``read_saved=False`` under checkpointing: reading a checkpointed node's
    saved tensor runs the checkpoint's unpack hook, i.e. a recompute, which would distort the step."""
    from saved_bytes import saved_tensor_bytes  # benchmarks/saved_bytes.py

    began = time.perf_counter()
    loss = loss_of(batch)
    forward = time.perf_counter()
    saved = saved_tensor_bytes(loss) if read_saved else float("nan")
    mid = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    done = time.perf_counter()
    return {"forward_s": forward - began, "backward_s": backward - mid, "optimizer_s": done - backward,
            "saved_for_backward_mb": saved / 1e6, "tokens": int(batch["attention_mask"].sum())}


def worker(args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity, profile

    model, loss_of, batch, optimizer = build(args, args.worker)
    read_saved = CONFIGS[args.worker].get("gradient_checkpointing", True) is False
    step(loss_of, batch, optimizer, read_saved)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        timing = step(loss_of, batch, optimizer, read_saved)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    timing["top_ops"] = [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 2), "calls": e.count} for e in events]
    timing["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    timing["shape"] = list(batch["input_ids"].shape)
    print("RESULT " + json.dumps(timing), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="before (no levers), after (the default)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    out = {"settings": vars(args), "load_before": os.getloadavg()}
    for config in args.configs.split(","):
        command = [sys.executable, __file__, "--worker", config, "--batch", str(args.batch), "--max-length",
                   str(args.max_length), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        out[config] = json.loads(lines[0][7:]) if lines else {"error": done.stderr[-2000:]}
        print(config, json.dumps(out[config], indent=1), flush=True)
    out["load_after"] = os.getloadavg()
    from results_io import write_json

    write_json(Path(args.out), out)


if __name__ == "__main__":
    main()
