"""The ``deltatune`` command's argument parser: one function per command; method options come from the dataclass
fields of every registered config (``deltatune.methods.METHODS``)."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from . import __version__
from .chat import add_chat_parsers, add_eval_generation_options
from .combine_cli import add_combine_parser
from .compare_adapters import add_adapter_rows_option
from .compare_cli import add_lm_compare_options

FIELD_FLAGS = {"text": "--text-field", "text_a": "--text-a-field", "text_b": "--text-b-field", "label": "--label-field",
               "prompt": "--prompt-field", "completion": "--completion-field"}

STACK_HELP = (
    "Stacks: --method A+B[+C] (e.g. lora+prefix) trains one adapter per part, named after it, all active together; "
    "baselines cannot be stacked. An unprefixed option (--r 8) goes to every part that has that field (--modules-to-save "
    "to the first part only: the head is trained once); --set PART.FIELD=VALUE sets one part (e.g. --set lora.r=16 "
    "--set prefix.num_virtual_tokens=10) and wins over the unprefixed form. A --config file for a stack maps part "
    "names to their options: {\"lora\": {\"r\": 8}, \"prefix\": {\"num_virtual_tokens\": 10}}. The run folder holds "
    "one PEFT-layout folder per part plus stack.json."
)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``deltatune train: error: ... (see deltatune train --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def add_data(p: argparse.ArgumentParser, eval_only: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=eval_only, help="folder with train.* and dev.*/validation.* and/or test.* "
                   "(jsonl, jsonl.gz, csv, tsv, parquet), or a Hugging Face dataset name[:config] (online)")
    g.add_argument("--task", choices=("classification", "causal-lm"), help="default: classification when rows have a label")
    g.add_argument("--max-length", type=int, default=None if eval_only else 128, help="truncate to this many tokens (128)")
    if not eval_only:
        g.add_argument("--max-train", type=int, help="train on a seeded random subset of N rows")
    g.add_argument("--max-eval", type=int, help="evaluate on a seeded random subset of N rows per split")
    g.add_argument("--chat-template", action="store_true", help="causal LM: render prompt/completion and Alpaca rows "
                   "as a user turn + an assistant turn with the model's chat template ('messages' rows always are)")
    g.add_argument("--label-words", type=_words, metavar="W0,W1,...", help="with --task causal-lm on labeled rows: "
                   "train/evaluate the classes as generated words (one per label id / sorted label name)")
    for name, flag in FIELD_FLAGS.items():
        g.add_argument(flag, dest=f"field_{name}", metavar="NAME", help=f"column holding '{name}' (default {name})")


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",")]


def add_training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and training")
    g.add_argument("--model", default="minilm", help="local HF folder, hub id (online), 'minilm' (default) or 'smollm2' (bundled)")
    g.add_argument("--k", type=int, default=2, help="last-layers: number of final blocks to train (2)")
    g.add_argument("--config", help="YAML/JSON file of method options (field names, or a PEFT adapter_config.json; "
                   "for a stack: part name -> options)")
    g.add_argument("--set", action="append", default=[], metavar="[PART.]FIELD=VALUE",
                   help="any method config field; PART. limits it to one part of a stack (--set lora.r=16)")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max-steps", type=int, help="stop after N optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--eval-batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, help="learning rate (default per method: full 5e-5, last-layers 1e-4, head 3e-2, adapters 3e-3 unless the method sets default_lr)")
    g.add_argument("--head-lr", type=float, help="learning rate of the task head (the fresh classifier, or the LM head) "
                   "in its own optimizer group; default: --lr, at least 3e-2 for a fresh head under an adapter method")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--optimizer", default="adamw", help="any torch.optim class name (adamw)")
    g.add_argument("--optimizer-args", default="{}", help="JSON of extra optimizer arguments")
    g.add_argument("--scheduler", choices=("linear", "cosine", "constant"), default="linear")
    g.add_argument("--warmup", type=float, default=0.1, help="warmup: fraction of steps if < 1, else steps (0.1)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this norm (0: off)")
    g.add_argument("--loraplus-ratio", type=float, help="LoRA+: lr of the B matrices = ratio * lr")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU")
    g.add_argument("--gradient-checkpointing", action="store_const", const=True, help="per block (default: causal LM on)")
    g.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_const", const=False)
    g.add_argument("--checkpoint-every", type=int, default=1, metavar="K",
                   help="with checkpointing: checkpoint every K-th decoder block (fewer: faster, more memory)")
    g.add_argument("--no-fused-ce", action="store_true", help="causal LM: full logits + cross-entropy (more memory)")
    g.add_argument("--quantize", choices=("nf4",), help="QLoRA: keep the frozen base's Linear weights in NF4 (adapter methods)")
    g.add_argument("--no-group-by-length", action="store_true", help="plain shuffled batches")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: each epoch end)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at each evaluation)")
    g.add_argument("--metric", help="model-selection metric: accuracy, f1, mcc, loss (default accuracy / LM loss)")
    g.add_argument("--threads", type=int, help="torch threads")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def add_method_options(p: argparse.ArgumentParser) -> None:
    from .train.options import option_table

    g = p.add_argument_group("method options (from the registered method configs)")
    taken = set(p._option_string_actions)
    for name, methods in option_table().items():
        flag = "--" + name.replace("_", "-")
        if flag in taken:
            continue
        g.add_argument(flag, dest=f"opt__{name}", metavar="V", help=f"[{', '.join(methods)}]")


def build_parser() -> argparse.ArgumentParser:
    from .serve.cli import add_serve_parser
    from .train.options import all_methods

    parser = Parser(prog="deltatune", description="Parameter-efficient fine-tuning for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"deltatune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    methods = ", ".join(all_methods())
    add_train_parser(sub, methods)
    add_compare_parser(sub, methods)
    add_eval_parser(sub)
    add_merge_parser(sub)
    add_inspect_parser(sub)
    add_combine_parser(sub)
    add_serve_parser(sub)
    add_chat_parsers(sub)
    return parser


def add_train_parser(sub: Any, methods: str) -> None:
    train = sub.add_parser("train", help="train one method; writes a run folder",
                           description=f"methods: {methods}. {STACK_HELP}")
    train.add_argument("--method", help=f"one of: {methods} (default lora), or adapter methods stacked with '+' "
                       f"(lora+prefix)")
    train.add_argument("--out", default="runs/run", help="run folder (runs/run)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--overwrite", action="store_true", help="start over in a folder that holds a run")
    train.add_argument("--settings-file", help=argparse.SUPPRESS)
    train.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="train with N processes (torchrun; gloo on CPU, NCCL on GPUs); --batch-size stays global")
    train.add_argument("--shard", action="store_true", help="with several processes: FSDP2 (shard the frozen base) "
                       "instead of DDP")
    add_data(train)
    add_training(train)
    add_method_options(train)
    add_common(train)


def add_compare_parser(sub: Any, methods: str) -> None:
    compare = sub.add_parser("compare", help="train several methods with the same budget; print a table",
                             description=f"methods: {methods}. {STACK_HELP}")
    compare.add_argument("--methods", help="comma list, stacks allowed (full,head,last-layers,lora; e.g. lora,lora+prefix)")
    add_adapter_rows_option(compare)
    compare.add_argument("--out", default="runs/compare", help="folder for the runs and the report (runs/compare)")
    add_lm_compare_options(compare)
    add_data(compare)
    add_training(compare)
    add_method_options(compare)
    add_common(compare)


def add_eval_parser(sub: Any) -> None:
    ev = sub.add_parser("eval", help="evaluate a base model with an adapter / run folder, or the base model alone")
    ev.add_argument("--model", help="base model (default: the one recorded in the run folder)")
    ev.add_argument("--adapter", help="adapter or run folder (none: evaluate the base model itself)")
    ev.add_argument("--split", help="comma list of splits (default: dev and test)")
    ev.add_argument("--batch-size", type=int, default=128)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--quantize", choices=("nf4",), help="quantize the base to NF4 (default: as it was trained)")
    ev.add_argument("--predictions", help="write per-row predictions and logits to this jsonl file")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_eval_generation_options(ev)
    add_data(ev, eval_only=True)
    add_common(ev)


def add_merge_parser(sub: Any) -> None:
    merge = sub.add_parser("merge", help="merge an adapter into the base; write a plain HF model folder")
    merge.add_argument("--model", help="base model (default: the one recorded in the run folder)")
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--out", required=True)
    merge.add_argument("--task", choices=("classification", "causal-lm"))
    merge.add_argument("--overwrite", action="store_true")
    add_common(merge)


def add_inspect_parser(sub: Any) -> None:
    inspect = sub.add_parser("inspect", help="print an adapter's config, tensors and parameter count; --spectrum: "
                             "singular values and effective rank of each layer's weight update dW")
    inspect.add_argument("adapter", nargs="*", help="adapter or run folder(s)")
    g = inspect.add_argument_group("spectrum of dW (LoRA/DoRA/AsyLoRA/MoRA: each layer's delta; full/last-layers "
                                   "runs, or --base-model/--tuned-model: W_tuned - W_base)")
    g.add_argument("--spectrum", action="store_true", help="print singular values / effective rank of each layer's dW")
    g.add_argument("--model", help="base model of the adapter/run folders (default: the one recorded in the run)")
    g.add_argument("--base-model", help="full fine-tuning: the base model folder (or 'minilm')")
    g.add_argument("--tuned-model", help="full fine-tuning: the tuned model folder (save_pretrained / deltatune merge)")
    g.add_argument("--layers", metavar="REGEX", help="only layers whose module path matches (default: every adapter "
                   "layer; for full fine-tuning every weight matrix except embeddings and task heads)")
    g.add_argument("--tol", type=float, default=1e-6, help="numerical rank: singular values > tol * largest (1e-6)")
    g.add_argument("--json", metavar="FILE", help="write the spectra (all singular values) as JSON")
    g.add_argument("--plot", metavar="FILE.png", help="plot s_i / s_1 per layer, log y, one panel per folder")
    add_common(inspect)
