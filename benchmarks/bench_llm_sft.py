"""LLM fine-tuning cost on the real SmolLM2-135M-Instruct and GSM8K: deltatune's ``train`` path vs HF PEFT.

Every row trains one epoch over the same seeded subset of GSM8K train rows (``--steps`` x ``--batch`` rows; chat
template, completion-only labels, ``--max-length``), LoRA r16 (alpha 32) on all linear layers, dropout 0.05,
AdamW, linear schedule with 10% warmup, gradient clipping at 1.0, ``--threads`` threads, one fresh process per row.
Rounds alternate the row order (A B C .. C B A ..) so slow phases of a shared machine hit every row alike.

Rows:
- ``deltatune``: ``deltatune.train.run.run_training`` with default settings (what ``deltatune train --model
  smollm2 --task causal-lm`` runs): fused chunked head + cross-entropy, per-block activation checkpointing,
  length-grouped batches padded per batch;
- ``dt-no-fused-ce`` / ``dt-no-checkpointing`` / ``dt-no-grouping``: one lever off; ``dt-no-levers``: all off
  (the train path before this issue); ``dt-plain-loss``: full logits and no checkpointing on the default's
  length-grouped batches (the plain path the default must equal, step for step); ``dt-pad-to-max``: the default levers, batches padded to ``--max-length``
  (the padded baseline of the tokens/s goal); ``dt-bf16``: the default plus ``--bf16`` autocast;
- ``full`` / ``full-no-levers``: full fine-tuning (lr 5e-5) with the levers / without;
- ``peft-loop``: HF PEFT + a plain loop, shuffled batches padded per batch (what transformers.Trainer does);
- ``peft-trainer``: HF PEFT + transformers.Trainer (DataCollatorForSeq2Seq padding).

Per process: wall and process CPU time of every optimizer step (forward + backward + clip + AdamW + schedule;
CPU time is the figure to compare on a shared machine), the epoch's train time (sum), real (non-padding) tokens,
median s/step, tokens/s, the losses, and whole-process peak RSS
(``ru_maxrss``: model load included). Reported per row: median over rounds; ratios vs ``peft-loop``.

    .venv/bin/python benchmarks/bench_llm_sft.py                       # 11 rows x 2 rounds, 4 steps of 8 x 512
    .venv/bin/python benchmarks/bench_llm_sft.py --rows deltatune,peft-loop --rounds 1 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_llm_sft.json"
DATA = Path(os.environ.get("GSM8K", Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"))
ROWS = ["deltatune", "peft-loop", "peft-trainer", "dt-no-fused-ce", "dt-no-checkpointing", "dt-ckpt2", "dt-ckpt3", "dt-no-grouping",
        "dt-no-levers", "dt-plain-loss", "dt-pad-to-max", "dt-bf16", "full", "full-no-levers"]
LEVERS_OFF = {"fused_ce": False, "gradient_checkpointing": False, "group_by_length": False}
VARIANTS = {  # row -> (method, settings overrides, pad to max length)
    "deltatune": ("lora", {}, False),
    "dt-no-fused-ce": ("lora", {"fused_ce": False}, False),
    "dt-no-checkpointing": ("lora", {"gradient_checkpointing": False}, False),
    "dt-no-grouping": ("lora", {"group_by_length": False}, False),
    "dt-ckpt2": ("lora", {"checkpoint_every": 2}, False),
    "dt-ckpt3": ("lora", {"checkpoint_every": 3}, False),
    "dt-no-levers": ("lora", LEVERS_OFF, False),
    "dt-plain-loss": ("lora", {"fused_ce": False, "gradient_checkpointing": False}, False),
    "dt-pad-to-max": ("lora", {}, True),
    "dt-bf16": ("lora", {"bf16": True}, False),
    "full": ("full", {}, False),
    "full-no-levers": ("full", LEVERS_OFF, False),
}
LORA = {"r": "16", "alpha": "32", "dropout": "0.05", "targets": "all-linear"}
LR = {"lora": 3e-3, "full": 5e-5}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def settings_for(args: argparse.Namespace, data_dir: str, out: str, method: str = "lora", **overrides):
    from deltatune.train.settings import RunSettings

    return RunSettings(
        data=data_dir, model="smollm2", method=method, method_options=dict(LORA) if method == "lora" else {},
        task="causal-lm", fields={"prompt": "question", "completion": "answer"}, chat_template=True,
        max_length=args.max_length, max_train=args.steps * args.batch, batch_size=args.batch, epochs=1.0,
        lr=LR[method], threads=args.threads, seed=0, out=out, quiet=True, **overrides,
    )


def train_only_data(folder: Path) -> str:
    """A data folder holding only GSM8K's train split (no dev/test evaluation inside the timed run)."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "train.jsonl.gz"
    if not link.exists():
        link.symlink_to(DATA / "train.jsonl.gz")
    return str(folder)


def run_deltatune(row: str, args: argparse.Namespace, tmp: Path) -> dict:
    import deltatune.train.trainer as trainer_module
    from deltatune.train.batching import collate
    from deltatune.train.run import run_training

    method, overrides, pad_to_max = VARIANTS[row]
    if pad_to_max:  # the padded baseline: every batch padded to --max-length
        def padded(data, indices, pad_id, task):
            batch = collate(data, indices, pad_id, task)
            extra = args.max_length - batch["input_ids"].shape[1]
            pads = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
            return {k: torch_pad(v, extra, pads[k]) for k, v in batch.items()}
        trainer_module.collate = padded
    times, losses, tokens, last, cpu = [], [], [], [0.0, 0], []
    step = trainer_module.Trainer._train_step

    def timed_step(self, group):  # process CPU time of each optimizer step (robust to other processes' load)
        began = time.process_time()
        out = step(self, group)
        cpu.append(time.process_time() - began)
        return out
    trainer_module.Trainer._train_step = timed_step

    def on_step(trainer, record):
        times.append(trainer.train_time - last[0])
        tokens.append(trainer.tokens - last[1])
        last[:] = [trainer.train_time, trainer.tokens]
        losses.append(record["loss"])

    settings = settings_for(args, train_only_data(tmp / "data"), str(tmp / "run"), method, **overrides)
    record = run_training(settings, overwrite=True, on_step=on_step)
    return {"times": times, "cpu_times": cpu, "losses": losses, "tokens": tokens,
            "checkpointed_blocks": record.get("checkpointed_blocks", 0)}


def torch_pad(tensor, extra: int, value: int):
    import torch.nn.functional as F

    return F.pad(tensor, (0, extra), value=value) if extra > 0 else tensor


def peft_setup(args: argparse.Namespace, tmp: Path):
    """(PEFT model, encoded rows, tokenizer): the same rows deltatune trains on, LoRA r16 all-linear."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from deltatune.train.models import load_tokenizer, resolve_model
    from deltatune.train.run import prepare_data

    torch.set_num_threads(args.threads)
    path = resolve_model("smollm2")
    tokenizer = load_tokenizer(path)
    data = prepare_data(settings_for(args, train_only_data(tmp / "data"), str(tmp / "run")), tokenizer).encoded["train"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, config), data, tokenizer


def run_peft_loop(args: argparse.Namespace, tmp: Path) -> dict:
    import torch
    from transformers import get_linear_schedule_with_warmup

    from deltatune.train.batching import collate

    model, data, tokenizer = peft_setup(args, tmp)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR["lora"], weight_decay=0.0)
    steps = -(-len(data) // args.batch)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    times, losses, tokens, cpu = [], [], [], []
    for start in range(0, len(order), args.batch):
        batch = collate(data, order[start : start + args.batch], tokenizer.pad_token_id, "causal-lm")
        began, cpu_began = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
        cpu.append(time.process_time() - cpu_began)
        losses.append(loss.item())
        tokens.append(int(batch["attention_mask"].sum()))
    return {"times": times, "cpu_times": cpu, "losses": losses, "tokens": tokens}


def run_peft_trainer(args: argparse.Namespace, tmp: Path) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    model, data, tokenizer = peft_setup(args, tmp)
    rows = [{"input_ids": f["input_ids"], "labels": y} for f, y in zip(data.features, data.labels)]
    times, cpu, tokens, began = [], [], [], [0.0, 0.0]

    class Timer(TrainerCallback):  # wall and process CPU time of each optimizer step, as for the other rows
        def on_step_begin(self, *a, **k):
            began[:] = [time.perf_counter(), time.process_time()]

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - began[0])
            cpu.append(time.process_time() - began[1])

    training = TrainingArguments(
        output_dir=str(tmp / "hf"), per_device_train_batch_size=args.batch, num_train_epochs=1, learning_rate=LR["lora"],
        warmup_steps=int(0.1 * args.steps), lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.0, logging_strategy="no",
        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False, seed=0,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=training, train_dataset=rows, data_collator=collator, callbacks=[Timer()])
    result = trainer.train()
    tokens = [sum(len(r["input_ids"]) for r in rows)]  # per epoch: the Trainer's batches are its own
    return {"times": times, "cpu_times": cpu, "losses": [result.training_loss], "tokens": tokens}


def worker(row: str, args: argparse.Namespace) -> None:
    before = load_avg()
    with tempfile.TemporaryDirectory(prefix="bench_llm_sft_") as tmp:
        if row == "peft-loop":
            out = run_peft_loop(args, Path(tmp))
        elif row == "peft-trainer":
            out = run_peft_trainer(args, Path(tmp))
        else:
            out = run_deltatune(row, args, Path(tmp))
    out.update(row=row, peak_rss_bytes=peak_rss(), load_before=before, load_after=load_avg())
    print("RESULT " + json.dumps(out), flush=True)


def run_row(row: str, args: argparse.Namespace) -> dict:
    """One row in a fresh process; its RESULT line parsed (or the error)."""
    command = [sys.executable, __file__, "--worker", row, "--steps", str(args.steps), "--batch", str(args.batch),
               "--max-length", str(args.max_length), "--threads", str(args.threads)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"row": row, "error": f"timed out after {args.timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"row": row, "error": (done.stderr or done.stdout)[-2000:]}


def summarise(runs: list[dict], rows: list[str]) -> dict:
    """Per row: medians over rounds of train time, s/step, tokens/s and peak RSS; ratios vs PEFT."""
    table = {}
    for row in rows:
        good = [r for r in runs if r["row"] == row and "error" not in r]
        if not good:
            continue
        table[row] = {
            "train_time_s": statistics.median(sum(r["times"]) for r in good),
            "s_per_step": statistics.median(statistics.median(r["times"]) for r in good),
            "cpu_s": statistics.median(sum(r.get("cpu_times") or [float("nan")]) for r in good),
            "tokens_per_s": statistics.median(sum(r["tokens"]) / sum(r["times"]) for r in good),
            "peak_rss_gb": statistics.median(r["peak_rss_bytes"] for r in good) / 1e9,
            "losses": good[0]["losses"], "rounds": len(good),
        }
    for base in ("peft-loop", "peft-trainer"):
        if base in table:
            for values in table.values():
                values[f"time_vs_{base}"] = round(values["train_time_s"] / table[base]["train_time_s"], 3)
                values[f"rss_vs_{base}"] = round(values["peak_rss_gb"] / table[base]["peak_rss_gb"], 3)
                values[f"cpu_vs_{base}"] = round(values["cpu_s"] / table[base]["cpu_s"], 3)
    reference = table.get("deltatune", {}).get("losses")
    for values in table.values():  # rows that see the same batches in the same order as the default
        if reference and len(values["losses"]) == len(reference):
            values["max_loss_diff_vs_deltatune"] = max(abs(a - b) for a, b in zip(values["losses"], reference))
    return table


def write_results(args: argparse.Namespace, runs: list[dict], rows: list[str], loads: dict, started: float) -> dict:
    from results_io import write_json

    summary = summarise(runs, rows)
    write_json(Path(args.out), {
        "settings": {k: v for k, v in vars(args).items() if k != "worker"}, "load_average": loads, "cpus": os.cpu_count(),
        "wall_s": round(time.time() - started, 1), "summary": summary, "runs": runs,
    })
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per row (rows = steps x batch)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1200)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args)
    rows = args.rows.split(",")
    runs, started = [], time.time()
    loads = {"before": load_avg()}
    for number in range(args.rounds):
        for row in rows if number % 2 == 0 else rows[::-1]:
            result = run_row(row, args)
            runs.append(result)
            shown = f"{sum(result['times']):.1f} s, {result['peak_rss_bytes'] / 1e9:.2f} GB" if "times" in result else result["error"][-300:]
            print(f"round {number + 1} {row}: {shown}", flush=True)
            loads["after"] = load_avg()
            summary = write_results(args, runs, rows, loads, started)  # after every row: a cut-short run keeps its rows
    for row, v in summary.items():
        print(f"{row:20s} {v['train_time_s']:7.1f} s  {v['cpu_s']:7.1f} cpu s  {v['tokens_per_s']:6.1f} tok/s  "
              f"{v['peak_rss_gb']:5.2f} GB  time x{v.get('time_vs_peft-loop', 0):.2f} cpu x{v.get('cpu_vs_peft-loop', 0):.2f} "
              f"rss x{v.get('rss_vs_peft-loop', 0):.2f}")


if __name__ == "__main__":
    main()
