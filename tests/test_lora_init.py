"""PiSSA / OLoRA initialisation: PEFT-equal factors, base function preserved, residual base, and saving as a plain
rank-2r LoRA that reproduces the fine-tuned model on the original base (in deltatune and in PEFT)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import deltatune as dt
from conftest import tiny_bert_model
from deltatune.layers import DeltaLayer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
TARGETS = ["query", "value", "intermediate.dense"]


bert = tiny_bert_model


def ids() -> torch.Tensor:
    return torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(1))


def hidden(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).last_hidden_state


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_and_residual_match_peft(init):
    base = bert()
    expected = hidden(base)
    ours = dt.wrap(copy.deepcopy(base), dt.LoraConfig(r=4, alpha=8, targets=TARGETS, init=init))
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
    assert (hidden(ours) - expected).abs().max() <= 1e-5  # the function is unchanged at init
    hosts = [(path, host) for path, host in ours.hosts() if isinstance(host, DeltaLayer)]
    assert len(hosts) == 6
    for path, host in hosts:
        reference = theirs.base_model.model.get_submodule(path)
        delta = host.adapters["default"]
        assert (host.weight - reference.base_layer.weight).abs().max() <= 1e-5, path
        assert (delta.lora_A.weight - reference.lora_A["default"].weight).abs().max() <= 1e-5, path
        assert (delta.lora_B.weight - reference.lora_B["default"].weight).abs().max() <= 1e-5, path
    host = ours.model.encoder.layer[0].attention.self.query
    delta = host.adapters["default"]
    original = base.encoder.layer[0].attention.self.query.weight
    principal = delta.scaling * delta.lora_B.weight @ delta.lora_A.weight
    assert (host.weight + principal - original).abs().max() <= 1e-5
    if init == "pissa":
        u, s, vh = torch.linalg.svd(original)
        assert (principal - (u[:, :4] * s[:4]) @ vh[:4]).abs().max() <= 1e-5


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_saved_as_plain_lora_reproduces_finetuned_model(init, tmp_path):
    base = bert()
    model = dt.wrap(copy.deepcopy(base), dt.LoraConfig(r=4, alpha=8, targets=TARGETS, init=init))
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    for _ in range(3):
        model(input_ids=ids()).last_hidden_state.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    tuned = hidden(model)
    model.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["r"] == 8 and data["lora_alpha"] == 16 and data["init_lora_weights"] is True
    loaded = dt.load(copy.deepcopy(base), tmp_path)
    assert (hidden(loaded) - tuned).abs().max() <= 1e-5
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert (hidden(theirs) - tuned).abs().max() <= 1e-5
    plain = model.merge_and_unload()
    assert not any(isinstance(m, DeltaLayer) for m in plain.modules())
    assert (hidden(plain) - tuned).abs().max() <= 1e-5


def test_conv1d_and_rslora(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
    base = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        expected = base(input_ids=ids()).logits
    model = dt.wrap(copy.deepcopy(base), dt.LoraConfig(r=4, alpha=8, rslora=True, targets=["c_attn"], init="pissa"))
    with torch.no_grad():
        assert (model(input_ids=ids()).logits - expected).abs().max() <= 1e-5
        for p in model.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
        tuned = model(input_ids=ids()).logits
    model.save(tmp_path)
    loaded = dt.load(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert (loaded(input_ids=ids()).logits - tuned).abs().max() <= 1e-5


def test_embedding_target_is_refused():
    with pytest.raises(dt.TargetError, match="Linear and Conv1D"):
        dt.wrap(bert(), dt.LoraConfig(r=2, targets=["word_embeddings"], init="pissa"))


def test_unconverted_peft_pissa_file_loads_and_saves_as_read(tmp_path):
    base = bert()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"], init_lora_weights="pissa"))
    theirs.save_pretrained(tmp_path / "peft")  # A, B relative to PEFT's residual base, as PEFT writes them
    loaded = dt.load(copy.deepcopy(base), tmp_path / "peft")
    assert loaded.configs["default"].init == "pissa"
    loaded.save(tmp_path / "again")
    from safetensors.torch import load_file

    first = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    second = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
