"""AsyLoRA: frozen orthonormal A, trainable B, half of LoRA's trainable parameters, merge and file round trips."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from conftest import tiny_bert_model
from deltatune.layers import DeltaLayer

transformers = pytest.importorskip("transformers")


bert = tiny_bert_model


def ids() -> torch.Tensor:
    return torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(1))


def deltas(model, name: str = "default"):
    return [h.adapters[name] for _, h in model.hosts() if isinstance(h, DeltaLayer) and name in h.adapters]


def test_a_is_orthonormal_frozen_and_only_b_learns():
    model = dt.wrap(bert(), dt.AsyLoraConfig(r=4, targets=["query", "value", "intermediate.dense"]))
    for delta in deltas(model):
        a = delta.lora_A.weight
        assert not a.requires_grad and delta.lora_B.weight.requires_grad
        assert (a @ a.T - torch.eye(4)).abs().max() <= 1e-5
        assert torch.count_nonzero(delta.lora_B.weight) == 0
    model.set_adapter("default")  # refreshing must not make A trainable
    model.model.train()
    model(input_ids=ids()).last_hidden_state.square().mean().backward()
    for delta in deltas(model):
        assert delta.lora_A.weight.grad is None and delta.lora_B.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_half_the_trainable_parameters_of_lora():
    lora = dt.wrap(bert(), dt.LoraConfig(r=4, targets=["query", "value"]))
    asy = dt.wrap(bert(), dt.AsyLoraConfig(r=4, targets=["query", "value"]))
    assert 2 * asy.count_parameters()[0] == lora.count_parameters()[0]


def test_merge_unmerge_and_save_load(tmp_path):
    model = dt.wrap(bert(), dt.AsyLoraConfig(r=4, alpha=8, targets=["query", "value"], init="random"))
    with torch.no_grad():
        expected = model(input_ids=ids()).last_hidden_state
        with model.disable_adapters():
            base = model(input_ids=ids()).last_hidden_state
        assert (expected - base).abs().max() > 1e-3
        model.merge()
        assert (model(input_ids=ids()).last_hidden_state - expected).abs().max() <= 1e-5
        model.unmerge()
        assert (model(input_ids=ids()).last_hidden_state - expected).abs().max() <= 1e-5
    model.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "ASYLORA" and data["r"] == 4
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    loaded = dt.load(bert(), tmp_path)
    assert isinstance(loaded.configs["default"], dt.AsyLoraConfig)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids()).last_hidden_state, expected)
    assert all(not d.lora_A.weight.requires_grad for d in deltas(loaded))


def test_rank_larger_than_input_is_refused():
    with pytest.raises(dt.TargetError, match="r <= in_features"):
        dt.wrap(bert(), dt.AsyLoraConfig(r=40, targets=["query"]))
