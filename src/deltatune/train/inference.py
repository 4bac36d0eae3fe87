"""``deltatune eval``, ``merge`` and ``inspect``: use what a run (or HF PEFT) wrote, on a freshly loaded base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import check_positive_int
from ..errors import AdapterFileError, ConfigError, MergeError
from ..io import CONFIG_NAME, WEIGHTS_NAME, atomic_write, read_config, save_adapter
from ..model import DeltaModel
from .artifacts import (
    BASELINE_CONFIG,
    BASELINE_WEIGHTS,
    STACK_CONFIG,
    artifact_kind,
    artifact_size,
    load_trained,
    read_stack,
)
from .data import Fields
from .generation import evaluate_generation
from .models import ModelError, load_model, load_tokenizer, quiet_transformers, resolve_model
from .run import prepare_data, read_run
from .settings import RunSettings
from .tasks import evaluate

TASK_TYPES = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal-lm"}


def _tensor_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    from safetensors import safe_open

    shapes = {}
    try:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                shapes[key] = (tuple(sl.get_shape()), sl.get_dtype())
    except BaseException as error:  # SafetensorError, or a Rust PanicException on a truncated file
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        raise AdapterFileError(f"{path} is not a readable safetensors file ({error}); save the adapter again") from error
    return shapes


def artifact_info(directory: Path | None) -> dict[str, Any]:
    """What a folder says about how to rebuild its model: task, labels, model, fields, max length."""
    if directory is None:
        return {}
    if not directory.is_dir():
        raise AdapterFileError(f"adapter folder {directory} does not exist")
    kind = artifact_kind(directory)
    info: dict[str, Any] = {"kind": kind}
    run = read_run(directory)
    if run is not None:
        settings = run.get("settings", {})
        info.update(task=run.get("task"), labels=run.get("labels"), model=settings.get("model"),
                    fields=settings.get("fields", {}), max_length=settings.get("max_length"),
                    chat_template=settings.get("chat_template"), label_words=settings.get("label_words"),
                    quantize=settings.get("quantize"), method=settings.get("method"))
    elif kind == "baseline":
        data = json.loads((directory / BASELINE_CONFIG).read_text(encoding="utf-8"))
        info.update(task=data.get("task"), labels=data.get("labels"), model=data.get("base_model"))
    elif kind == "stack":  # a merged folder's stack.json has no base_model: the folder is the base model
        data = read_stack(directory)
        info.update(task=data.get("task"), labels=data.get("labels"), model=data.get("base_model") or str(directory),
                    method=data.get("method"))
    else:
        config = read_config(directory)
        info["task"] = TASK_TYPES.get(config.task_type or "")
        info["model"] = config.base_model_name_or_path
        for name in config.modules_to_save or []:
            for key, (shape, _) in _tensor_shapes(directory / WEIGHTS_NAME).items():
                if key.endswith(f"{name}.weight") and len(shape) == 2 and info.get("task") == "classification":
                    info["labels"] = shape[0]
    return {k: v for k, v in info.items() if v is not None}


def load_for_inference(
    model_name: str | None, adapter: Path | None, task: str | None, labels: Any, seed: int = 0, quantize: str | None = None,
    need_tokenizer: bool = True,
) -> tuple[nn.Module, Any, str, Any]:
    """(model with the trained weights applied, tokenizer, task, labels); the tokenizer is None when the base folder
    has none and ``need_tokenizer`` is False (merging needs only weights)."""
    quiet_transformers()
    info = artifact_info(adapter)
    name = model_name or info.get("model")
    if not name:
        raise ConfigError("pass --model (the base model the adapter was trained on)")
    path = resolve_model(name)
    tokenizer = load_tokenizer(path) if need_tokenizer else optional_tokenizer(path)
    task = task or info.get("task") or "classification"
    labels = labels if labels is not None else info.get("labels")
    num = labels if isinstance(labels, int) else len(labels) if labels else 2
    pad_id = tokenizer.pad_token_id if tokenizer is not None else None
    model, _ = load_model(path, task, num, labels if isinstance(labels, list) else None, seed, pad_id)
    quantize = quantize or info.get("quantize")
    if quantize:
        from .models import quantize_base

        quantize_base(model, quantize, info.get("kind") == "baseline", info.get("method", "?"))
    if adapter is not None:
        model = load_trained(model, adapter)
    model.eval()
    return model, tokenizer, task, labels


def optional_tokenizer(path: str) -> Any:
    """The model folder's tokenizer, or None when it has none."""
    try:
        return load_tokenizer(path)
    except (ModelError, OSError, ValueError, TypeError):
        return None


def run_eval(args: Any) -> dict[str, Any]:
    """Metrics per split of a run / adapter folder, or of the base model itself when there is no ``--adapter``;
    with ``--generate`` (causal LM) also the exact match of greedily generated answers."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    adapter = Path(args.adapter) if args.adapter else None
    info = artifact_info(adapter)
    settings = RunSettings(
        data=args.data, model=args.model or info.get("model", "minilm"), task=args.task or info.get("task", "auto"),
        fields={**info.get("fields", {}), **args.fields}, max_length=args.max_length or info.get("max_length", 128),
        chat_template=bool(getattr(args, "chat_template", False) or info.get("chat_template")),
        label_words=getattr(args, "label_words", None) or info.get("label_words"),
        max_eval=args.max_eval, seed=args.seed, eval_batch_size=args.batch_size, quiet=True,
    )
    wanted = args.split.split(",") if args.split else None
    tokenizer = load_tokenizer(resolve_model(settings.model))
    data = prepare_data(settings, tokenizer, need_train=False, labels=info.get("labels"), only=wanted,
                        skip=() if wanted else ("train",))
    task = None if settings.task == "auto" else settings.task
    model, tokenizer, task, labels = load_for_inference(settings.model, adapter, task or (None if adapter else data.task),
                                                        data.labels if adapter is None else info.get("labels"),
                                                        quantize=getattr(args, "quantize", None))
    if wanted is None:
        wanted = [s for s in ("dev", "test") if s in data.encoded]
        if not wanted:
            raise ConfigError(f"{settings.data} has no labeled dev or test split; pass --split train to evaluate on train")
    if data.task != task:
        raise ConfigError(f"the data is a {data.task} dataset but the model was trained for {task}; pass --task")
    generate = bool(getattr(args, "generate", False))
    if generate and task != "causal-lm":
        raise ConfigError("--generate needs a causal LM and prompt/completion, messages or Alpaca data")
    if generate:
        check_positive_int("--max-new-tokens", args.max_new_tokens)
    results: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for split in [s for s in wanted if s in data.encoded]:
        result = evaluate(model, data.encoded[split], task, tokenizer.pad_token_id, settings.eval_batch_size,
                          data.num_classes, keep_logits=bool(args.predictions))
        results[split] = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        for i, prediction in enumerate(result.get("predictions", [])):
            rows.append({"split": split, "index": i, "label": data.encoded[split].labels[i], "prediction": prediction,
                         "logits": result["logits"][i] if args.predictions else None})
        if generate:
            metrics, records = evaluate_generation(
                model, tokenizer, data.rows[split], Fields(**settings.fields), settings.chat_template,
                args.max_new_tokens, args.batch_size, args.answer_regex, split, quiet=getattr(args, "quiet", False),
                choices=settings.label_words)
            results[split].update(metrics)
            rows += records
    if args.predictions:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(Path(args.predictions), lambda p: Path(p).write_text(text, encoding="utf-8"))
    return results


def run_merge(args: Any) -> tuple[Path, list[str]]:
    """Merge the adapter(s) into the base weights and write a plain HF model folder (+ tokenizer); returns the
    folder and the adapters that could not be merged.

    For a stack, the mergeable parts (LoRA family) are merged; the others (prefix, prompt, bottleneck adapters)
    cannot be, so each is written to ``<out>/<name>/`` (PEFT layout, loads onto the merged model with ``dt.load``)
    with a ``stack.json`` listing them: ``deltatune eval --adapter <out>`` then runs the merged model with them.
    A stack with no mergeable part, like a single unmergeable method, is refused."""
    adapter = Path(args.adapter)
    model, tokenizer, task, labels = load_for_inference(args.model, adapter, args.task, None, need_tokenizer=False)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    (out / STACK_CONFIG).unlink(missing_ok=True)  # an overwritten folder is a stack only if this merge says so
    kept: list[str] = []
    if not isinstance(model, DeltaModel):
        plain = model
    elif len(model.active_adapters) == 1:
        plain = model.merge_and_unload()
    else:
        names = model.active_adapters
        kept = [n for n in names if not getattr(model.configs[n], "mergeable", False)]
        merged = [n for n in names if n not in kept]
        if not merged:
            raise MergeError(f"none of the adapters {', '.join(names)} in {adapter} can be merged into the weights "
                             f"(they are not weight updates); use the run folder with its base model as it is")
        model.merge(merged)
        for name in kept:
            save_adapter(model, out / name, name)
        plain = model.unload(keep=names)
        info = {"adapters": kept, "merged": merged, "method": "+".join(names), "task": task, "labels": labels}
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if kept:
        text = json.dumps(info, indent=2, sort_keys=True) + "\n"
        (out / STACK_CONFIG).write_text(text, encoding="utf-8")  # last: the folder is a stack once complete
    return out, kept


def _adapter_lines(directory: Path, indent: str = "") -> tuple[list[str], int]:
    """Config and tensor lines of one adapter / baseline folder, and its parameter count."""
    kind = artifact_kind(directory)
    lines: list[str] = []
    if kind == "adapter":
        config_text = (directory / CONFIG_NAME).read_text(encoding="utf-8")
        config = read_config(directory)
        lines += [f"method: {type(config).method or type(config).__name__} (peft_type {config.peft_type})", "config:"]
        lines += ["  " + line for line in json.dumps(json.loads(config_text), indent=2, sort_keys=True).splitlines()]
        weights = directory / WEIGHTS_NAME
    else:
        lines += ["config:", "  " + (directory / BASELINE_CONFIG).read_text(encoding="utf-8").strip().replace("\n", "\n  ")]
        weights = directory / BASELINE_WEIGHTS
    shapes = _tensor_shapes(weights)
    total = 0
    lines.append(f"tensors ({len(shapes)}):")
    for key, (shape, dtype) in sorted(shapes.items()):
        numel = 1
        for s in shape:
            numel *= s
        total += numel
        lines.append(f"  {key}  {list(shape)}  {dtype}  {numel:,}")
    lines.append(f"parameters: {total:,}")
    return [indent + line for line in lines], total


def inspect_text(directory: Path) -> str:
    """A readable summary of an adapter / stack / run folder: config, tensors, parameter counts, sizes, results."""
    kind = artifact_kind(directory)
    if kind == "stack":
        stack = read_stack(directory)
        names = stack["adapters"]
        merged = f"; merged into the base: {', '.join(stack['merged'])}" if stack.get("merged") else ""
        lines = [f"{directory} (stack of {len(names)} PEFT-layout adapters, active together: {', '.join(names)}{merged})"]
        total = 0
        for name in names:
            part_lines, count = _adapter_lines(directory / name, "  ")
            lines += [f"adapter '{name}' ({directory / name}):", *part_lines]
            total += count
        lines.append(f"parameters (all adapters): {total:,}")
    else:
        lines = [f"{directory} ({'PEFT-layout adapter' if kind == 'adapter' else 'baseline weights'})"]
        lines += _adapter_lines(directory)[0]
    lines.append(f"size on disk: {artifact_size(directory):,} bytes")
    run = read_run(directory)
    if run and run.get("results"):
        r = run["results"]
        lines.append(
            f"run: {r['method']} status {run.get('status')}; trainable {r['trainable_params']:,} "
            f"({r['trainable_pct']:.2f}%); best dev {r['metric']} {r.get('best_dev')}; test {r.get('test_metric')}"
        )
    return "\n".join(lines)


__all__ = ["artifact_info", "inspect_text", "load_for_inference", "run_eval", "run_merge"]
