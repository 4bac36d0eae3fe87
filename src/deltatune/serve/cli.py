"""``deltatune serve``: the subcommand's options (registered by ``deltatune.cli``) and its entry point.

Importing this module is cheap: fastapi, uvicorn and transformers are only imported when the command runs.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to the ``deltatune`` subparsers."""
    p = sub.add_parser("serve", help="serve many adapters on one base over HTTP (mixed-adapter batches)",
                       description="HTTP JSON service: POST /v1/classify, /v1/completions; GET/POST/DELETE /v1/adapters")
    p.add_argument("--model", required=True, help="base model: local HF folder, hub id (online), 'minilm' or 'smollm2'")
    p.add_argument("--adapters", nargs="*", default=[], metavar="NAME=PATH|DIR",
                   help="adapter folders: NAME=PATH, one adapter folder, or a folder of adapter folders (loaded lazily)")
    p.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                   help="folder POST /v1/adapters may load from (the --adapters folders are always allowed)")
    p.add_argument("--task", choices=("classify", "complete"), help="default: from the model class")
    p.add_argument("--num-labels", type=int, default=2, help="classification head size of the base (2)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-loaded", type=int, default=8, help="adapters kept in memory; least recently used go (8)")
    p.add_argument("--max-batch", type=int, default=32, help="rows per micro-batch (32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more rows (5 ms)")
    p.add_argument("--max-length", type=int, default=512, help="longest input in tokens (512)")
    p.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens a completion may ask for (256)")
    p.add_argument("--api-key-env", default="DELTATUNE_API_KEY",
                   help="environment variable holding the API key for the adapter endpoints (DELTATUNE_API_KEY)")
    p.add_argument("--compile", action="store_true", help="torch.compile the base once the first adapter is loaded; "
                   "--max-loaded LoRA slots of rank --max-rank take every later adapter by hot-swap (no recompiling)")
    p.add_argument("--max-rank", type=int, help="with --compile: the largest LoRA rank an adapter may have (64)")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def parse_sources(values: list[str]) -> tuple[list[tuple[str, Path]], list[Path]]:
    """``NAME=PATH`` pairs and plain folders (one adapter or a folder of adapters)."""
    named: list[tuple[str, Path]] = []
    folders: list[Path] = []
    for value in values:
        name, sep, path = value.partition("=")
        if sep:
            if not name or not path:
                raise ConfigError(f"--adapters {value!r}: use NAME=PATH or a folder")
            named.append((name, Path(path)))
        else:
            folders.append(Path(value))
    return named, folders


def compiled_slots(args: argparse.Namespace) -> Any:
    """``--compile``: the slots adapters are hot-swapped into (``deltatune.serve.compiled``); else None."""
    from .compiled import CompiledSlots

    if not args.compile:
        if args.max_rank is not None:
            raise ConfigError("--max-rank goes with --compile (the slots' rank); add --compile or drop --max-rank")
        return None
    return CompiledSlots(args.max_loaded, 64 if args.max_rank is None else args.max_rank)


def build(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The FastAPI app for the parsed options, and what uvicorn needs (host, port)."""
    import torch

    from ..train.models import load_model, load_tokenizer, quiet_transformers, resolve_model
    from .app import create_app
    from .engine import Engine, infer_task
    from .registry import AdapterRegistry

    quiet_transformers()
    if args.threads:
        torch.set_num_threads(args.threads)
    named, folders = parse_sources(args.adapters)
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    task = args.task
    if task is None:
        from transformers import AutoConfig

        architectures = getattr(AutoConfig.from_pretrained(path), "architectures", None) or []
        task = "complete" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) else "classify"
    base, _ = load_model(path, "classification" if task == "classify" else "causal-lm", num_labels=args.num_labels,
                         pad_id=tokenizer.pad_token_id)
    allowed = [p for _, p in named] + folders + [Path(d) for d in args.allow_dir]
    registry = AdapterRegistry(base, allowed, max_loaded=args.max_loaded, compiled=compiled_slots(args))
    for name, folder in named:
        registry.add(name, folder)
    for folder in folders:
        registry.scan(folder)
    engine = Engine(base, tokenizer, registry, task=task or infer_task(base), max_length=args.max_length,
                    max_tokens=args.max_tokens)
    api_key = os.environ.get(args.api_key_env) or None
    app = create_app(engine, max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000, api_key=api_key,
                     base_name=args.model)
    return app, {"host": args.host, "port": args.port, "api_key": api_key is not None}


def run(args: argparse.Namespace) -> int:
    import uvicorn

    app, where = build(args)
    try:
        loopback = ipaddress.ip_address(where["host"]).is_loopback
    except ValueError:
        loopback = where["host"] == "localhost"
    if not loopback and not where["api_key"]:
        print(f"deltatune serve: warning: listening on {where['host']} without an API key; anyone who can reach it "
              f"may load adapters from the allowed folders (set {args.api_key_env})", file=sys.stderr)
    print(f"deltatune serve: http://{where['host']}:{where['port']} ({len(app.state.engine.registry.sources)} adapters)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=where["host"], port=where["port"], log_level="warning")
    return 0
