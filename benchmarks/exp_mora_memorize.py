"""MoRA's memorisation claim (Jiang et al. 2024, arXiv 2405.12130, sec. 3 "UUID pairs"), at CPU scale.

Task: the script draws ``--pairs`` seeded random UUID4 keys and values and trains a small causal LM to complete
``<bos> key : value <eos>`` (loss on the value and <eos> only). Every ``--eval-every`` steps it greedily generates the
value for every key and logs exact match (whole value right) and character accuracy (fraction of the 36 value
characters right given the true prefix). Both come from one teacher-forced pass with the argmax taken over the
characters; exact match is then identical to greedy generation's (see ``evaluate``), at 1/36 of the cost.

Model: a random-init Llama from a small transformers config over a 20-symbol character vocabulary (hex digits, '-',
':', <bos>, <eos>, <pad>). There is no small pretrained causal LM on this offline machine, and a brief pretraining
run would cost the CPU budget and teach nothing about UUIDs anyway, so the frozen base is the random init (the same
seeded weights for every method). The adapters must therefore store all the information themselves, which is the
quantity MoRA's claim is about: how much an update of a given parameter count can memorise.

Methods (same seed, data order, steps, batch, constant lr after a short warmup):
- ``lora-r8``: LoRA r=8, alpha=16 on every linear layer (q, k, v, o, gate, up, down);
- ``mora-r8``: MoRA with the parameter budget of LoRA r=8 on the same layers (r_hat = sqrt((in+out)*8), even:
  ``deltatune.methods.mora.mora_rank``; type 6, the authors' choice for small ranks);
- ``lora-r32``: LoRA r=32 (alpha=64: the same s = 2), half the full rank of the 64-wide layers;
- ``full``: full fine-tuning of every weight.

``--model smollm2``: the same task on the pretrained SmolLM2-135M-Instruct (the claim on a real LLM): each pair is
``key:value<|im_end|>`` in its own BPE tokens (loss on the value tokens and the end token), the adapters on every
linear layer of the 30 blocks, exact match / token accuracy teacher-forced over the whole vocabulary (exact match
again equals greedy generation's, token for token). ``full`` is left out there (CPU budget).

Results are cached per method in the JSON (a method whose settings are unchanged is not re-run; ``--force`` re-runs),
so an interrupted run resumes with the next method.

    .venv/bin/python benchmarks/exp_mora_memorize.py            # writes benchmarks/results/mora_memorize.json
                                                                 # and docs/img/mora_memorize.png
    .venv/bin/python benchmarks/exp_mora_memorize.py --model smollm2 --pairs 32 --steps 60 --batch 8 \
        --eval-every 10 --lr 2e-3 --methods lora-r8,mora-r8      # -> mora_memorize_smollm2.json / .png
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from results_io import write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import deltatune as dt  # noqa: E402

CHARS = "0123456789abcdef-:"
BOS, EOS, PAD = len(CHARS), len(CHARS) + 1, len(CHARS) + 2
VOCAB = len(CHARS) + 3
UUID_LEN = 36
METHODS = ("lora-r8", "mora-r8", "lora-r32", "full")


def make_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (key, value) UUID4 strings drawn from ``random.Random(seed)``; keys are distinct."""
    rng = random.Random(seed)
    pairs, keys = [], set()
    while len(pairs) < n:
        key = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if key not in keys:
            keys.add(key)
            pairs.append((key, value))
    return pairs


def encode(pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [n, 75] = <bos> key : value <eos>; labels = ids on value + <eos>, -100 elsewhere."""
    rows = [[BOS] + [CHARS.index(c) for c in k + ":" + v] + [EOS] for k, v in pairs]
    ids = torch.tensor(rows)
    labels = torch.full_like(ids, -100)
    start = 1 + UUID_LEN + 1  # first value position
    labels[:, start:] = ids[:, start:]
    return ids, labels


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    return LlamaForCausalLM(config)


def apply_method(model: torch.nn.Module, method: str) -> torch.nn.Module:
    torch.manual_seed(1234)  # adapter init, identical across runs
    if method == "full":
        return model
    if method.startswith("lora-r"):
        r = int(method[len("lora-r"):])
        return dt.wrap(model, dt.LoraConfig(r=r, alpha=2 * r, targets="all-linear"))
    if method.startswith("mora-r"):
        return dt.wrap(model, dt.MoraConfig(r=int(method[len("mora-r"):]), targets="all-linear"))
    raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


@torch.no_grad()
def evaluate(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """One teacher-forced pass; at each of the 36 value positions the prediction is the argmax over the characters.

    exact_match equals that of greedy generation from ``<bos> key :``: up to the first wrong position greedy decoding
    sees the true prefix, so a value is generated exactly iff every teacher-forced argmax is right.
    char_accuracy is the teacher-forced (next-character given the true prefix) accuracy over the 36 characters."""
    model.eval()
    start = 1 + UUID_LEN + 1
    logits = model(input_ids=ids).logits[:, start - 1: start - 1 + UUID_LEN, : len(CHARS)]
    model.train()
    hit = logits.argmax(-1) == ids[:, start: start + UUID_LEN]
    return {"exact_match": hit.all(1).float().mean().item(), "char_accuracy": hit.float().mean().item()}


class SmolTask:
    """The UUID pairs in SmolLM2's own tokens: right-padded ids, labels on the value + end token (-100 elsewhere)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        from deltatune.train.models import load_tokenizer, quiet_transformers, resolve_model

        quiet_transformers()
        self.path = resolve_model("smollm2")
        tok = load_tokenizer(self.path)
        rows = []
        for key, value in pairs:
            head = tok(key + ":", add_special_tokens=False)["input_ids"]
            tail = tok(value, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append((head + tail, [-100] * len(head) + tail))
        width = max(len(r[0]) for r in rows)
        self.ids = torch.tensor([r[0] + [tok.pad_token_id] * (width - len(r[0])) for r in rows])
        self.labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])

    def build_model(self, args: argparse.Namespace) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.path)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, ids: torch.Tensor) -> dict[str, float]:
        """Teacher-forced argmax over the vocabulary at every target token: exact match (every token of the value
        and the end token right, i.e. greedy generation reproduces it) and token accuracy."""
        model.eval()
        logits = model(input_ids=ids).logits[:, :-1]
        model.train()
        targets = self.labels[:, 1:]
        mask = targets != -100
        hit = (logits.argmax(-1) == targets) | ~mask
        return {"exact_match": hit.all(1).float().mean().item(),
                "char_accuracy": ((hit & mask).sum() / mask.sum()).item()}  # token accuracy here


def run_method(method: str, args: argparse.Namespace, ids: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    task = getattr(args, "task", None)
    build, evaluate_fn = (task.build_model, task.evaluate) if task is not None else (build_model, evaluate)
    model = apply_method(build(args), method)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    lr = args.lr_full if method == "full" else args.lr
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    order = torch.Generator().manual_seed(args.seed)
    n = ids.shape[0]
    curve: list[dict[str, float]] = [{"step": 0, "loss": math.nan, **evaluate_fn(model, ids)}]
    perm, pos, losses = torch.randperm(n, generator=order), 0, []
    start = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        if pos + args.batch > n:
            perm, pos = torch.randperm(n, generator=order), 0
        rows = perm[pos: pos + args.batch]
        pos += args.batch
        logits = model(input_ids=ids[rows]).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[rows, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            point = {"step": step, "loss": sum(losses) / len(losses), **evaluate_fn(model, ids)}
            losses = []
            curve.append(point)
            print(f"  {method:9s} step {step:5d} loss {point['loss']:.4f} exact {point['exact_match']:.3f} "
                  f"char {point['char_accuracy']:.3f}", flush=True)
    return {"trainable_params": trainable, "lr": lr, "wall_s": round(time.perf_counter() - start, 1), "curve": curve}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("model", "pairs", "steps", "batch", "eval_every", "hidden", "layers", "seed", "data_seed", "lr", "lr_full",
            "threads")
    return {k: getattr(args, k) for k in keys}


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, result in data["methods"].items():
        steps = [p["step"] for p in result["curve"]]
        label = f"{method} ({result['trainable_params']:,} params)"
        axes[0].plot(steps, [p["exact_match"] for p in result["curve"]], label=label)
        axes[1].plot(steps, [p["char_accuracy"] for p in result["curve"]], label=label)
    for ax, title in zip(axes, ("exact match (whole UUID value)", "character accuracy")):
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    s = data["settings"]
    model = "SmolLM2-135M-Instruct" if s.get("model") == "smollm2" else f"random-init Llama {s['layers']}x{s['hidden']}"
    fig.suptitle(f"UUID memorisation: {s['pairs']} pairs, {model}, seed {s['seed']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("tiny", "smollm2"), default="tiny", help="random-init small Llama (tiny) or "
                   "the pretrained SmolLM2-135M-Instruct")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--pairs", type=int, default=128)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="model init and data order")
    p.add_argument("--data-seed", type=int, default=0, help="UUID pairs")
    p.add_argument("--lr", type=float, default=3e-3, help="adapters (LoRA, MoRA)")
    p.add_argument("--lr-full", type=float, default=1e-3, help="full fine-tuning")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="default: benchmarks/results/mora_memorize[_smollm2].json")
    p.add_argument("--plot", help="default: docs/img/mora_memorize[_smollm2].png")
    p.add_argument("--force", action="store_true", help="re-run methods already in the JSON")
    args = p.parse_args()
    suffix = "_smollm2" if args.model == "smollm2" else ""
    args.out = args.out or str(ROOT / f"benchmarks/results/mora_memorize{suffix}.json")
    args.plot = args.plot or str(ROOT / f"docs/img/mora_memorize{suffix}.png")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    out = Path(args.out)
    current = settings(args)
    data: dict[str, Any] = {"settings": current, "methods": {}}
    if out.is_file():
        old = json.loads(out.read_text(encoding="utf-8"))
        if old.get("settings") == current:
            data = old
    if args.model == "smollm2":
        args.task = SmolTask(make_pairs(args.pairs, args.data_seed))
        ids, labels = args.task.ids, args.task.labels
    else:
        ids, labels = encode(make_pairs(args.pairs, args.data_seed))
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method in data["methods"] and not args.force:
            print(f"{method}: cached in {out}")
            continue
        print(f"{method}: training {args.steps} steps", flush=True)
        data["methods"][method] = run_method(method, args, ids, labels)
        data["torch"], data["threads"] = torch.__version__, torch.get_num_threads()
        write_json(out, data)
    plot(data, Path(args.plot))
    print(f"wrote {out} and {args.plot}")
    for method, r in data["methods"].items():
        last = r["curve"][-1]
        print(f"{method:9s} params {r['trainable_params']:>8,}  exact {last['exact_match']:.3f}  "
              f"char {last['char_accuracy']:.3f}  wall {r['wall_s']}s")


if __name__ == "__main__":
    main()
