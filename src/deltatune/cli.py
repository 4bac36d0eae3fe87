"""The ``deltatune`` command: train / compare / eval / merge / inspect / serve / generate / chat.

Method options are generated from the dataclass fields of every config class in ``deltatune.methods.METHODS``
(``--r``, ``--alpha``, ``--targets`` ...); a field whose flag would clash with a trainer flag is set with
``--set FIELD=VALUE``. Methods stack with '+' (``--method lora+prefix``, see ``STACK_HELP``). Errors print one line
and exit with 2 (1 for a failed run, 130 when interrupted); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .chat import run_chat
from .cli_parser import FIELD_FLAGS, Parser, build_parser  # noqa: F401  (build_parser: public here)
from .combine_cli import run as cmd_combine
from .compare_cli import cmd_compare
from .errors import ConfigError, DeltatuneError


# ---- args -> settings --------------------------------------------------------------------------------------------
def _fields(args: argparse.Namespace) -> dict[str, str]:
    return {name: getattr(args, f"field_{name}") for name in FIELD_FLAGS if getattr(args, f"field_{name}", None)}


def settings_from_args(args: argparse.Namespace, method: str) -> Any:
    from .train.options import method_from_file, read_config_file
    from .train.settings import RunSettings

    options = {k[len("opt__"):]: v for k, v in vars(args).items() if k.startswith("opt__") and v is not None}
    for item in args.set:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        part, dot, field = name.strip().rpartition(".")
        options[part + dot + field.replace("-", "_")] = value  # PART.FIELD: one part of a stack
    if not args.data:
        raise ConfigError("--data is required: a folder with train/dev/test files, or a Hugging Face dataset name")
    file_values: dict[str, Any] = {}
    if args.config:
        file_values = read_config_file(args.config)
        method = method or method_from_file(file_values) or "lora"
    try:
        optimizer_args = json.loads(args.optimizer_args)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--optimizer-args must be a JSON object: {error}") from error
    if not isinstance(optimizer_args, dict):
        raise ConfigError("--optimizer-args must be a JSON object such as '{\"betas\": [0.9, 0.99]}'")
    return RunSettings(
        data=args.data, model=args.model, method=method or "lora", method_options=options, config_values=file_values,
        k=args.k, task=args.task or "auto", fields=_fields(args), max_length=args.max_length, chat_template=args.chat_template,
        label_words=args.label_words, max_train=args.max_train,
        max_eval=args.max_eval, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, lr=args.lr, weight_decay=args.weight_decay, optimizer=args.optimizer,
        optimizer_args=optimizer_args, scheduler=args.scheduler, warmup=args.warmup, grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm or None, loraplus_ratio=args.loraplus_ratio, head_lr=args.head_lr, seed=args.seed, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every, fused_ce=not args.no_fused_ce, quantize=args.quantize, group_by_length=not args.no_group_by_length,
        eval_every=args.eval_every, save_every=args.save_every, metric=args.metric, threads=args.threads,
        out=args.out, resume=getattr(args, "resume", False), quiet=args.quiet,
    )


# ---- commands ----------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from .report import format_table
    from .train.run import run_training
    from .train.settings import RunSettings

    if args.settings_file:
        settings = RunSettings.from_dict(json.loads(Path(args.settings_file).read_text(encoding="utf-8")))
    else:
        settings = settings_from_args(args, args.method)
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch_torchrun(args, settings)
    record = run_training(settings, overwrite=args.overwrite, shard=args.shard)
    if os.environ.get("RANK", "0") != "0":
        return 0
    results = record["results"]
    print(format_table([results], results["metric"]))
    print(f"run folder: {settings.out}")
    return 0


def launch_torchrun(args: argparse.Namespace, settings: Any) -> int:
    """``deltatune train --nproc N ...`` = ``torchrun --standalone --nproc_per_node N -m deltatune train ...``."""
    import signal
    import subprocess
    import tempfile

    handle, path = tempfile.mkstemp(prefix="deltatune-settings-", suffix=".json")
    with os.fdopen(handle, "w", encoding="utf-8") as f:
        json.dump(settings.to_dict(), f)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "deltatune", "train", "--settings-file", path]
    command += [flag for flag, on in (("--overwrite", args.overwrite), ("--shard", args.shard), ("--debug", args.debug)) if on]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the workers; wait for them
    try:
        return subprocess.call(command)
    finally:
        signal.signal(signal.SIGINT, previous)
        os.unlink(path)


def cmd_eval(args: argparse.Namespace) -> int:
    from .train.inference import run_eval

    args.fields = _fields(args)
    results = run_eval(args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for split, metrics in results.items():
            print(f"{split}: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .train.inference import run_merge

    out, kept = run_merge(args)
    if not kept:
        print(f"merged model written to {out} (loads with transformers' from_pretrained, no deltatune needed)")
        return 0
    print(f"merged model written to {out}; adapters {', '.join(kept)} cannot be merged and stay adapters in "
          f"{', '.join(str(out / k) for k in kept)}: from_pretrained({str(out)!r}) alone lacks them; "
          f"'deltatune eval --adapter {out}' or dt.load(model, '{out / kept[0]}', name='{kept[0]}') applies them")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .train.inference import inspect_text

    full_ft = args.base_model or args.tuned_model
    if not args.spectrum:
        if full_ft or args.json or args.plot:
            raise ConfigError("--base-model/--tuned-model/--json/--plot go with --spectrum")
        if not args.adapter:
            raise ConfigError("pass an adapter or run folder")
        print("\n\n".join(inspect_text(Path(folder)) for folder in args.adapter))
        return 0
    from . import spectrum

    sources = []
    if full_ft:
        if not (args.base_model and args.tuned_model):
            raise ConfigError("--base-model and --tuned-model go together (dW = tuned - base)")
        sources.append((f"{args.tuned_model} - {args.base_model}",
                        spectrum.model_deltas(args.base_model, args.tuned_model, args.layers)))
    sources += [(folder, spectrum.run_deltas(Path(folder), args.model, args.layers)) for folder in args.adapter]
    if not sources:
        raise ConfigError("pass adapter/run folders, or --base-model and --tuned-model")
    entries = []
    for label, deltas in sources:
        records = spectrum.spectra(deltas, args.layers, args.tol)
        if not records:
            raise ConfigError(f"{label}: no layer matched --layers {args.layers!r}")
        print(f"{label}: spectrum of dW per layer\n{spectrum.format_table(records)}\n")
        entries.append({"source": label, "summary": spectrum.summary(records), "layers": records})
    if args.json:
        spectrum.write_json(entries, Path(args.json))
        print(f"spectra written to {args.json}")
    if args.plot:
        spectrum.plot({e["source"]: e["layers"] for e in entries}, Path(args.plot))
        print(f"plot written to {args.plot}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.cli import run

    return run(args)


COMMANDS = {"train": cmd_train, "compare": lambda args: cmd_compare(args, settings_from_args), "eval": cmd_eval, "merge": cmd_merge, "inspect": cmd_inspect,
            "serve": cmd_serve, "combine": cmd_combine, "generate": run_chat, "chat": run_chat}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .compare import CompareError
    from .train.trainer import Interrupted, TrainingError

    try:
        return COMMANDS[args.command](args)
    except Exception as error:
        if args.debug:
            raise
        if isinstance(error, Interrupted):
            print(f"deltatune {args.command}: {error}", file=sys.stderr)
            return 130
        if isinstance(error, (TrainingError, CompareError)):
            print(f"deltatune {args.command}: error: {error}", file=sys.stderr)
            return 1
        if isinstance(error, (DeltatuneError, OSError)):  # OSError: a file system fault (no space, permission)
            print(f"deltatune {args.command}: error: {error}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"deltatune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
