"""``deltatune compare``'s command: its causal-LM options and the run (kept out of ``cli`` to keep it short)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_lm_compare_options(p: argparse.ArgumentParser) -> None:
    """``compare`` on causal-LM data: the base model's row first, plus exact match and forgetting columns."""
    g = p.add_argument_group("causal-LM comparison (a base-model row first; see deltatune.compare_lm)")
    g.add_argument("--em-rows", type=int, default=30, metavar="N", help="exact match of greedy generations on the "
                   "first N held-out rows (30; 0: skip generation)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="tokens per generated answer at most (256)")
    g.add_argument("--answer-regex", metavar="REGEX", help="the answer is the last match (its first group if any); "
                   "default: the first number after the last '####', else the last number")
    g.add_argument("--forgetting-data", metavar="FOLDER", help="general text the task does not train on (rows with a "
                   "'text' field, e.g. ../shared/data/imdb): forgetting = the rise in loss on it over the base model")
    g.add_argument("--forgetting-rows", type=int, default=32, metavar="N", help="seeded rows of --forgetting-data (32)")
    g.add_argument("--samples", type=int, default=3, metavar="N", help="sample generations per method in report.md (3)")


def cmd_compare(args: argparse.Namespace, settings_from_args: Callable[[argparse.Namespace, str], Any]) -> int:
    """``deltatune compare``; ``settings_from_args`` is the CLI's options-to-RunSettings rule (passed in, so this
    module does not import ``cli``)."""
    from .compare import compare
    from .compare_adapters import methods_and_rows

    methods, rows = methods_and_rows(args.methods, args.adapters)
    peft = next((m for m in methods if m not in ("full", "head", "last-layers", "qlora")), None)
    if args.config:  # the --config file belongs to the entry it names (e.g. a stack), else to the first adapter method
        from .train.options import method_from_file, read_config_file

        named = method_from_file(read_config_file(args.config))
        peft = named if named in methods else peft
    from .compare_lm import LmOptions

    settings = settings_from_args(args, peft or (methods[0] if methods else "lora"))
    lm = LmOptions(em_rows=args.em_rows, max_new_tokens=args.max_new_tokens, answer_regex=args.answer_regex,
                   forgetting_data=args.forgetting_data, forgetting_rows=args.forgetting_rows, samples=args.samples)
    compare(settings, methods, Path(args.out), debug=args.debug, lm=lm, adapters=rows)
    return 0
