"""``deltatune combine``: one adapter folder from a weighted combination of trained adapters / run folders
(``DeltaModel.add_weighted_adapter``); the result is a plain LoRA adapter folder that ``eval``, ``merge``,
``serve`` and ``dt.load`` take like any other."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .task_vectors import COMBINATION_TYPES


def add_combine_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``combine`` subcommand to the ``deltatune`` subparsers."""
    p = sub.add_parser("combine", help="combine trained adapters (task arithmetic, TIES, DARE, ...) into one adapter",
                       description="Every type is defined on the adapters' dense weight updates dW_i; 'cat' stores "
                       "sum w_i dW_i exactly, the others a rank --rank truncated SVD (its error is printed).")
    p.add_argument("--adapters", nargs="+", required=True, metavar="NAME=DIR",
                   help="adapter or run folders (LoRA family, DoRA, MoRA), each NAME=DIR")
    p.add_argument("--weights", help="comma list, one per adapter (default: 1 each)")
    p.add_argument("--type", default="svd", choices=COMBINATION_TYPES, help="combination type (svd)")
    p.add_argument("--density", type=float, help="ties/dare/magnitude_prune: fraction of entries kept")
    p.add_argument("--rank", type=int, help="rank of the result (default: the largest input rank; not for cat)")
    p.add_argument("--majority-sign", default="total", choices=("total", "frequency"), help="TIES sign election")
    p.add_argument("--seed", type=int, default=0, help="DARE's random drops (0)")
    p.add_argument("--head-from", metavar="NAME", help="adapter whose task head (modules_to_save) the result keeps, "
                   "when several adapters have one")
    p.add_argument("--model", help="base model (default: the one recorded in the first folder)")
    p.add_argument("--out", required=True, help="folder for the combined adapter")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def parse_pairs(items: list[str], weights: str | None) -> tuple[dict[str, Path], list[float]]:
    """``["a=DIR", ...]`` and ``"1,0.5"`` -> ({name: folder}, weights), with errors naming the bad item."""
    folders: dict[str, Path] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--adapters takes NAME=DIR items, got {item!r}")
        if name in folders:
            raise ConfigError(f"adapter name {name!r} is given twice in --adapters")
        folders[name] = Path(folder)
    if weights is None:
        return folders, [1.0] * len(folders)
    try:
        values = [float(w) for w in weights.split(",")]
    except ValueError as error:
        raise ConfigError(f"--weights must be a comma list of numbers, got {weights!r}") from error
    if len(values) != len(folders):
        raise ConfigError(f"--weights has {len(values)} numbers for {len(folders)} adapters; give one per adapter")
    return folders, values


def run(args: argparse.Namespace) -> int:
    from .io import CONFIG_NAME, load
    from .train.inference import artifact_info, load_for_inference

    folders, weights = parse_pairs(args.adapters, args.weights)
    out = Path(args.out)
    if (out / CONFIG_NAME).exists() and not args.overwrite:
        raise ConfigError(f"{out} already holds an adapter; pass --overwrite or choose another --out")
    infos = {name: artifact_info(folder) for name, folder in folders.items()}
    wrong = [f"{n} ({i['kind']})" for n, i in infos.items() if i["kind"] != "adapter"]
    if wrong:
        raise ConfigError(f"combine takes single-adapter folders; {', '.join(wrong)} are not")
    first = infos[next(iter(folders))]
    model, _, _, _ = load_for_inference(args.model or first.get("model"), None, first.get("task"), first.get("labels"))
    for name, folder in folders.items():
        model = load(model, folder, name=name)
    report = model.add_weighted_adapter(
        list(folders), weights, "combined", args.type, args.rank, args.density, args.majority_sign, args.seed,
        args.head_from,
    )
    model.save(out, adapter="combined")
    print(report)
    print(f"combined adapter written to {out}")
    return 0
