"""ReLoRA's claim (Lialin et al. 2023, arXiv 2307.05695), at CPU scale: a sum of rank-r updates, merged and restarted,
pretrains a transformer nearly as well as full-rank training, and better than one LoRA of the same rank.

Corpus: IMDb train reviews (``--data``, a local jsonl.gz with a "text" field), character level. A seeded choice of
``--train-reviews`` reviews is the training corpus, ``--val-reviews`` others the validation set; the vocabulary is the
``--vocab`` most frequent characters of the training corpus plus <unk>. Batches are random ``--seq``-character
windows drawn from a generator seeded by (seed, step), so every method sees the same batch at the same step.

Model: a Llama from a small transformers config, random init (seed ``--seed``).

Methods, all ``--steps`` optimizer steps, AdamW, batch ``--batch`` x ``--seq``:
- ``full``: full-rank training, linear warmup then cosine decay to 10% of ``--lr-full``;
- ``lora``: the paper's warm start (the full-rank run's first ``--warm-steps`` steps), then LoRA r=``--r`` on every
  linear layer of the blocks (q, k, v, o, gate, up, down) for the remaining steps; embeddings, norms and the output
  layer keep training as in the paper; no restarts;
- ``relora``: the same warm start and LoRA, plus ReLoRA restarts every ``--every`` steps (``deltatune.ReLoRA``: merge
  s B A into W, re-initialise A and B, prune 99% of the LoRA optimizer state, jagged cosine schedule with a
  ``--rewarm``-step re-warmup).
- ``lora-scratch``: LoRA (same rank, same trainable embeddings/norms/output layer) from the random init, no warm
  start, no restarts: the "LoRA alone cannot pretrain" baseline.
``lora`` and ``relora`` use the same learning rate and cosine envelope; they differ only in the restarts.
AdamW uses beta2 = ``--beta2`` (0.99) for every method: the paper restarts thousands of steps apart (5,000 in its
main runs, as we read it), several times Adam's default beta2 time constant (1,000 steps); ours are 50x closer, and with beta2 = 0.999 the second moment,
99% pruned at a restart, stays far below its steady state for the rest of the interval while the bias correction
assumes it is complete, so every post-restart step is several times too large (we measured a jump of the train loss
from 2.19 to 2.85 right after the first restart with 0.999 and r=16). 0.99 keeps the ratio of interval to time
constant near the paper's.

For the LoRA methods the JSON also records the rank of the total update of the LoRA'd weights since LoRA started
(``update_rank``: mean rank90 / entropy rank / numerical rank over layers, via ``deltatune.spectrum``): one LoRA can
reach at most r, ReLoRA's sum of merged updates more.

Validation perplexity (per character, and bits per character) on ``--val-windows`` fixed windows every
``--eval-every`` steps. Results are cached per method in the JSON (unchanged settings are not re-run; ``--force``
re-runs); the warm-start weights are cached in ``runs/relora_pretrain/`` (git-ignored).

    .venv/bin/python benchmarks/exp_relora_pretrain.py   # writes benchmarks/results/relora_pretrain.json and
                                                         # docs/img/relora_pretrain.png
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from results_io import write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import deltatune as dt  # noqa: E402
from deltatune.spectrum import adapter_deltas  # noqa: E402

METHODS = ("full", "lora", "relora", "lora-scratch")


# ---- data --------------------------------------------------------------------------------------------------------
def load_corpus(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(train ids, validation ids, vocabulary) at character level; reviews joined with a newline."""
    with gzip.open(args.data, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    order = list(range(len(texts)))
    random.Random(args.data_seed).shuffle(order)
    train = "\n".join(texts[i] for i in order[: args.train_reviews])
    val = "\n".join(texts[i] for i in order[args.train_reviews: args.train_reviews + args.val_reviews])
    vocab = ["<unk>"] + [c for c, _ in collections.Counter(train).most_common(args.vocab)]
    index = {c: i for i, c in enumerate(vocab)}

    def encode(text: str) -> torch.Tensor:
        return torch.tensor([index.get(c, 0) for c in text], dtype=torch.long)

    return encode(train), encode(val), vocab


def batch_at(corpus: torch.Tensor, step: int, args: argparse.Namespace) -> torch.Tensor:
    """The batch of step ``step``: ``--batch`` random windows of ``--seq + 1`` characters (same for every method)."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, corpus.numel() - args.seq - 1, (args.batch,), generator=gen)
    return torch.stack([corpus[s: s + args.seq + 1] for s in starts.tolist()])


def val_windows(val: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    gen = torch.Generator().manual_seed(12345)
    starts = torch.randint(0, val.numel() - args.seq - 1, (args.val_windows,), generator=gen)
    return torch.stack([val[s: s + args.seq + 1] for s in starts.tolist()])


# ---- model and training ------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, vocab_size: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 8 * 8,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.seq + 1, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def lm_loss(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=windows[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


@torch.no_grad()
def validate(model: torch.nn.Module, windows: torch.Tensor) -> dict[str, float]:
    model.eval()
    loss = sum(lm_loss(model, chunk).item() * len(chunk) for chunk in windows.split(32)) / len(windows)
    model.train()
    return {"val_loss": loss, "val_ppl": math.exp(loss), "val_bpc": loss / math.log(2)}


def cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Run:
    """Training loop state shared by the three methods: logs the train loss and validates on a schedule."""

    def __init__(self, model: torch.nn.Module, corpus: torch.Tensor, windows: torch.Tensor, args: argparse.Namespace, name: str):
        self.model, self.corpus, self.windows, self.args, self.name = model, corpus, windows, args, name
        self.curve: list[dict[str, float]] = []
        self.update_rank: dict[str, float] = {}
        self.losses: list[float] = []

    def step(self, step: int, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        loss = lm_loss(self.model, batch_at(self.corpus, step, self.args))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())
        done = step + 1
        if done % self.args.eval_every == 0 or done == self.args.steps:
            point = {"step": done, "train_loss": sum(self.losses) / len(self.losses), **validate(self.model, self.windows)}
            self.losses = []
            self.curve.append(point)
            print(f"  {self.name:7s} step {done:5d} train {point['train_loss']:.4f} val ppl {point['val_ppl']:.3f}", flush=True)


def train_full(run: Run, start: int, stop: int) -> None:
    """Full-rank steps [start, stop) of the full run's schedule (warmup then cosine over ``--steps``)."""
    params = [p for p in run.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run.args.lr_full, betas=(0.9, run.args.beta2), weight_decay=0.0)
    for step in range(start, stop):
        for group in optimizer.param_groups:
            group["lr"] = run.args.lr_full * cosine(step, run.args.steps, run.args.warmup)
        run.step(step, optimizer, params)


def warm_start(args: argparse.Namespace, vocab_size: int, corpus: torch.Tensor, windows: torch.Tensor) -> torch.nn.Module:
    """The full run's weights after ``--warm-steps`` steps (cached; recomputed identically when missing)."""
    model = build_model(args, vocab_size)
    key = hashlib.sha256(json.dumps(settings(args), sort_keys=True).encode()).hexdigest()[:12]
    cache = ROOT / "runs/relora_pretrain" / f"warm-{key}.pt"
    if cache.is_file():
        model.load_state_dict(torch.load(cache))
        return model
    run = Run(model, corpus, windows, args, "warm")
    run.args = argparse.Namespace(**{**vars(args), "eval_every": 10**9})
    train_full(run, 0, args.warm_steps)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model


def train_lora(run: Run, restarts: bool, start: int) -> int:
    """LoRA (or ReLoRA) steps [start, steps): LoRA on the blocks' linears; embeddings, norms, output layer train."""
    args = run.args
    model = dt.wrap(run.model, dt.LoraConfig(r=args.r, alpha=2 * args.r, targets="all-linear"))
    for name, p in model.named_parameters():
        if "lora_" not in name and ("embed" in name or "norm" in name or "lm_head" in name):
            p.requires_grad_(True)
    run.model = model
    targeted = dict(adapter_deltas(model))
    before = {path: host.weight.detach().double().clone() for path, host in model.hosts() if path in targeted}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, args.beta2), weight_decay=0.0)
    relora = dt.ReLoRA(model, optimizer, every=args.every if restarts else 10**9, prune=0.99, warmup=args.rewarm,
                       initial_warmup=args.rewarm if start else args.warmup, total_steps=args.steps - start,
                       min_lr_ratio=0.1)
    for step in range(start, args.steps):
        run.step(step, optimizer, params)
        relora.step()
    run.update_rank = update_rank(model, before)
    return relora.restarts


def update_rank(model: Any, before: dict[str, torch.Tensor]) -> dict[str, float]:
    """Rank of the total update of the LoRA'd weights since LoRA started: (W0 now - W0 then) + the current s B A
    (ReLoRA has merged its earlier updates into W0). Means over layers of ``deltatune.spectrum``'s measures."""
    from deltatune.spectrum import layer_spectrum

    current = dict(adapter_deltas(model))
    records = [layer_spectrum(path, host.weight.detach().double() - before[path] + current[path].double())
               for path, host in model.hosts() if path in before]
    n = len(records)
    return {"layers": n, "max_rank": min(r["max_rank"] for r in records),
            "mean_rank90": sum(r["rank90"] for r in records) / n, "mean_erank": sum(r["erank"] for r in records) / n,
            "mean_numerical_rank": sum(r["numerical_rank"] for r in records) / n}


def run_method(method: str, args: argparse.Namespace, corpus: torch.Tensor, windows: torch.Tensor, vocab: int) -> dict[str, Any]:
    start = time.perf_counter()
    if method == "full":
        run = Run(build_model(args, vocab), corpus, windows, args, method)
        run.curve.append({"step": 0, "train_loss": math.nan, **validate(run.model, windows)})
        train_full(run, 0, args.steps)
        trainable, restarts, extra = sum(p.numel() for p in run.model.parameters()), 0, {}
    elif method == "lora-scratch":
        run = Run(build_model(args, vocab), corpus, windows, args, method)
        run.curve.append({"step": 0, "train_loss": math.nan, **validate(run.model, windows)})
        restarts = train_lora(run, restarts=False, start=0)
        trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        extra = {"update_rank": run.update_rank}
    else:
        run = Run(warm_start(args, vocab, corpus, windows), corpus, windows, args, method)
        run.curve.append({"step": args.warm_steps, "train_loss": math.nan, **validate(run.model, windows)})
        restarts = train_lora(run, restarts=method == "relora", start=args.warm_steps)
        trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        extra = {"update_rank": run.update_rank}
    return {"trainable_params": trainable, "restarts": restarts, "wall_s": round(time.perf_counter() - start, 1),
            "final_val_ppl": run.curve[-1]["val_ppl"], **extra, "curve": run.curve}


# ---- bookkeeping -------------------------------------------------------------------------------------------------
def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("data", "train_reviews", "val_reviews", "vocab", "seq", "batch", "steps", "warm_steps", "every", "rewarm",
            "warmup", "r", "beta2", "hidden", "layers", "heads", "lr", "lr_full", "seed", "data_seed", "val_windows", "eval_every")
    return {k: getattr(args, k) for k in keys}


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = data["settings"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, result in data["methods"].items():
        curve = [p for p in result["curve"] if p["step"] > 0]
        label = f"{method} ({result['trainable_params']:,} trainable; final ppl {result['final_val_ppl']:.2f})"
        ax.plot([p["step"] for p in curve], [p["val_ppl"] for p in curve], label=label, marker=".", ms=3)
    if "relora" in data["methods"]:
        for k in range(s["warm_steps"] + s["every"], s["steps"], s["every"]):
            ax.axvline(k, color="grey", lw=0.6, ls=":")
    ax.axvline(s["warm_steps"], color="black", lw=0.6, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step (dashed: end of the full-rank warm start; dotted: ReLoRA restarts)")
    ax.set_ylabel("validation perplexity (per character)")
    ax.set_title(f"char-level Llama {s['layers']}x{s['hidden']} on IMDb reviews, LoRA r={s['r']}, seed {s['seed']}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/imdb/train.jsonl.gz"))
    p.add_argument("--train-reviews", type=int, default=4000)
    p.add_argument("--val-reviews", type=int, default=500)
    p.add_argument("--vocab", type=int, default=96, help="most frequent characters kept (others -> <unk>)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--warm-steps", type=int, default=150, help="full-rank warm start of lora/relora (paper: 25%%)")
    p.add_argument("--every", type=int, default=100, help="ReLoRA restart interval")
    p.add_argument("--rewarm", type=int, default=15, help="ReLoRA re-warmup steps")
    p.add_argument("--warmup", type=int, default=50, help="warmup of the full run")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--beta2", type=float, default=0.99, help="AdamW beta2, all methods (see the module docstring)")
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3, help="lora / relora")
    p.add_argument("--lr-full", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--val-windows", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/relora_pretrain.json"))
    p.add_argument("--plot", default=str(ROOT / "docs/img/relora_pretrain.png"))
    p.add_argument("--force", action="store_true")
    args = p.parse_args()
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
    corpus, val, vocab = load_corpus(args)
    windows = val_windows(val, args)
    data["corpus"] = {"train_chars": corpus.numel(), "val_chars": val.numel(), "vocab_size": len(vocab),
                      "unk_rate_val": (val == 0).float().mean().item()}
    print(f"corpus: {corpus.numel():,} train / {val.numel():,} validation characters, vocab {len(vocab)}", flush=True)
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if method in data["methods"] and not args.force:
            print(f"{method}: cached in {out}")
            continue
        print(f"{method}: training", flush=True)
        data["methods"][method] = run_method(method, args, corpus, windows, len(vocab))
        data["torch"], data["threads"] = torch.__version__, torch.get_num_threads()
        write_json(out, data)
    plot(data, Path(args.plot))
    print(f"wrote {out} and {args.plot}")
    for method, r in data["methods"].items():
        rank = r.get("update_rank")
        extra = f"  update rank90 {rank['mean_rank90']:.1f} / {rank['max_rank']}" if rank else ""
        print(f"{method:12s} trainable {r['trainable_params']:>9,}  restarts {r['restarts']}  val ppl {r['final_val_ppl']:.3f}  "
              f"wall {r['wall_s']}s{extra}")


if __name__ == "__main__":
    main()
