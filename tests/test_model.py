"""DeltaModel behaviour: freezing, multiple adapters, disable, delete, merge/unmerge/unload, state dicts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import assert_rows_match_single_runs
from deltatune.layers import DeltaLayer, TrainableCopies


def ids(vocab: int = 128, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


def test_wrap_freezes_base_in_place_without_copying(minilm_cls):
    weight = minilm_cls.bert.encoder.layer[0].attention.self.query.weight
    model = dt.wrap(minilm_cls, dt.LoraConfig(r=8, targets=["query", "value"]))
    assert model.model is minilm_cls
    host = minilm_cls.bert.encoder.layer[0].attention.self.query
    assert isinstance(host, DeltaLayer) and host.weight is weight  # same Parameter object: nothing copied
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)
    # 6 layers x 2 targets x (A: 8x384 + B: 384x8)
    assert model.count_parameters()[0] == 6 * 2 * 2 * 8 * 384
    line = model.print_trainable()
    assert line.startswith("trainable: 73,728 / ") and line.endswith("%)")


def test_zero_init_equals_base_and_disable_is_exact(llama):
    reference = copy.deepcopy(llama)
    model = dt.wrap(llama, dt.LoraConfig(r=4, targets="all-linear", init="random")).eval()
    x = ids()
    with torch.no_grad():
        base_out = reference(input_ids=x).logits
        adapted = model(input_ids=x).logits
        with model.disable_adapters():
            disabled = model(input_ids=x).logits
        again = model(input_ids=x).logits
    assert not torch.allclose(adapted, base_out)
    assert torch.equal(disabled, base_out)
    assert torch.equal(again, adapted)
    fresh = dt.wrap(copy.deepcopy(reference), dt.LoraConfig(r=4, targets="all-linear")).eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x).logits, base_out)  # B = 0 at init: exactly the base


def test_all_linear_skips_the_head(llama, minilm, minilm_cls):
    model = dt.wrap(llama, dt.LoraConfig(r=2, targets="all-linear"))
    adapted = [p for p, _ in model.hosts()]
    assert len(adapted) == 2 * 7 and not any("lm_head" in p for p in adapted)
    assert len(list(dt.wrap(minilm, dt.LoraConfig(targets="all-linear")).hosts())) == 37
    cls_paths = [p for p, _ in dt.wrap(minilm_cls, dt.LoraConfig(targets="all-linear")).hosts()]
    assert len(cls_paths) == 37 and "classifier" not in cls_paths


def test_multiple_adapters_sum_and_switch(llama):
    reference = copy.deepcopy(llama)
    model = dt.wrap(llama, dt.LoraConfig(r=4, targets=["q_proj", "v_proj"], init="random"), name="a").eval()
    model.add_adapter("b", dt.LoraConfig(r=2, alpha=4, targets=["v_proj", "o_proj"], init="random"))
    assert model.active_adapters == ["a"]
    x = ids()
    with torch.no_grad():
        base = reference(input_ids=x).logits
        out_a = model(input_ids=x).logits
        model.set_adapter("b")
        out_b = model(input_ids=x).logits
        model.set_adapter(["a", "b"])
        both = model(input_ids=x).logits
    assert not torch.allclose(out_a, out_b)
    # deltas sum exactly at the layer level; compare against merging both into a plain copy
    merged_ref = copy.deepcopy(model)
    merged_ref.merge(["a", "b"])
    plain = merged_ref.unload()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, both, atol=1e-5)
        assert not torch.allclose(both, base)
    trainable = {n.split(".adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"a", "b"}
    model.set_adapter("a")
    trainable = {n.split(".adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"a"}


def test_delete_adapter_restores_plain_modules(llama):
    reference = copy.deepcopy(llama)
    model = dt.wrap(llama, dt.LoraConfig(r=4, targets=["q_proj"], init="random"), name="a")
    model.add_adapter("b", dt.LoraConfig(r=4, targets=["q_proj", "k_proj"], init="random"))
    model.delete_adapter("b")
    assert model.active_adapters == ["a"] and list(model.configs) == ["a"]
    assert type(llama.model.layers[0].self_attn.k_proj) is nn.Linear
    assert isinstance(llama.model.layers[0].self_attn.q_proj, DeltaLayer)
    model.delete_adapter("a")
    assert type(llama.model.layers[0].self_attn.q_proj) is nn.Linear
    assert llama.state_dict().keys() == reference.state_dict().keys()
    with pytest.raises(dt.ConfigError, match="no adapter named 'a'"):
        model.delete_adapter("a")


def test_merge_refuses_tied_weights(gpt2):
    model = dt.wrap(gpt2, dt.LoraConfig(r=4, targets=["c_attn", "wte"], init="random"))
    before = gpt2.lm_head.weight.detach().clone()
    with pytest.raises(dt.MergeError, match="tied to \\['lm_head.weight'\\]"):
        model.merge()
    assert torch.equal(gpt2.lm_head.weight, before) and model.merged_adapters == []


def test_merge_unmerge_and_merge_and_unload(gpt2):
    reference = copy.deepcopy(gpt2)
    model = dt.wrap(gpt2, dt.LoraConfig(r=4, alpha=8, targets=["c_attn", "c_fc", "wpe"], init="random")).eval()
    x = ids()
    with torch.no_grad():
        unmerged = model(input_ids=x).logits
        model.merge()
        assert model.merged_adapters == ["default"]
        merged = model(input_ids=x).logits
        model.unmerge()
        back = model(input_ids=x).logits
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert torch.allclose(back, unmerged, atol=1e-6)
    current = gpt2.state_dict()
    for name, value in reference.state_dict().items():
        assert torch.allclose(value, current[name], atol=1e-6), name
    plain = model.merge_and_unload()
    assert type(plain) is type(reference)
    assert not any(isinstance(m, (DeltaLayer, TrainableCopies)) for m in plain.modules())
    assert plain.state_dict().keys() == reference.state_dict().keys()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, unmerged, atol=1e-5)


def test_merge_computes_in_float32_for_bf16_weights():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    original = base[0].weight.detach().clone()
    model = dt.wrap(base, dt.LoraConfig(r=4, alpha=1, targets=["0"], init="random"))
    delta = model.model[0].adapters["default"].delta_weight(model.model[0])
    model.merge()
    expected = (original.float() + delta).to(torch.bfloat16)
    assert torch.equal(base[0].weight, expected)


def test_safe_merge_refuses_non_finite_and_changes_nothing(mlp):
    model = dt.wrap(mlp, dt.LoraConfig(r=2, targets=["fc1", "fc2"], init="random"))
    with torch.no_grad():
        model.model.fc2.adapters["default"].lora_B.weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(dt.MergeError, match="NaN/inf"):
        model.merge(safe=True)
    assert model.merged_adapters == []
    for key, value in mlp.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_merged_state_blocks_switching_and_disable(mlp):
    model = dt.wrap(mlp, dt.LoraConfig(r=2, targets=["fc1"]), name="a")
    model.add_adapter("b", dt.LoraConfig(r=2, targets=["fc2"]))
    model.merge()
    with pytest.raises(dt.MergeError, match="unmerge"):
        model.set_adapter("b")
    with pytest.raises(dt.MergeError, match="unmerge"), model.disable_adapters():
        pass
    with pytest.raises(dt.MergeError, match="unmerge"):
        model.delete_adapter("a")
    model.unmerge()
    model.set_adapter("b")


def test_plain_module_and_gradients_reach_only_adapters(mlp):
    model = dt.wrap(mlp, dt.LoraConfig(r=4, targets=["embed", "fc1", "fc2"], dropout=0.1))
    model.train()
    loss = model(ids(50)).pow(2).sum()
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    # at init B gets the gradient for Linear (B = 0), A for Embedding (A = 0)
    assert model.model.fc1.adapters["default"].lora_B.weight.grad.abs().sum() > 0
    assert model.model.embed.adapters["default"].lora_embedding_A.grad.abs().sum() > 0


def test_state_dict_keeps_base_keys_and_loads_base_checkpoints(llama):
    checkpoint = copy.deepcopy(llama.state_dict())
    model = dt.wrap(llama, dt.LoraConfig(r=2, targets=["q_proj"], init="random"))
    keys = set(llama.state_dict())
    assert set(checkpoint) <= keys
    assert all(".adapters." in k for k in keys - set(checkpoint))
    with torch.no_grad():
        llama.model.layers[0].self_attn.q_proj.weight.zero_()
    result = model.load_state_dict(checkpoint, strict=False)  # a plain base checkpoint, no "model." prefix
    assert not result.unexpected_keys
    assert torch.equal(llama.model.layers[0].self_attn.q_proj.weight, checkpoint["model.layers.0.self_attn.q_proj.weight"])
    own = copy.deepcopy(model.state_dict())
    fresh = dt.wrap(copy.deepcopy(llama), dt.LoraConfig(r=2, targets=["q_proj"]))
    fresh.load_state_dict(own)  # its own state dict, strictly
    for key, value in own.items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_modules_to_save_copies_are_trained_and_unloaded(bert):
    reference = copy.deepcopy(bert)
    model = dt.wrap(bert, dt.LoraConfig(r=2, targets=["query"], modules_to_save=["classifier"])).eval()
    head = bert.classifier
    assert isinstance(head, TrainableCopies)
    assert head.copies["default"].weight.requires_grad and not head.weight.requires_grad
    with torch.no_grad():
        head.copies["default"].weight.add_(1.0)
        out = model(input_ids=ids()).logits
        with model.disable_adapters():
            assert torch.equal(model(input_ids=ids()).logits, reference(input_ids=ids()).logits)
    plain = model.merge_and_unload()
    assert type(plain.classifier) is nn.Linear
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids()).logits, out, atol=1e-5)


def test_mixed_adapter_batch_equals_single_runs(llama):
    model = dt.wrap(llama, dt.LoraConfig(r=4, targets=["q_proj", "v_proj"], init="random"), name="a").eval()
    model.add_adapter("b", dt.LoraConfig(r=2, targets=["v_proj", "embed_tokens"], init="random"))
    x = ids(shape=(3, 8))
    rows = ["a", "__base__", "b"]
    assert_rows_match_single_runs(model, x, rows)
    with pytest.raises(dt.ConfigError, match="unknown adapters"):
        model(input_ids=x, adapter_names=["a", "zz", "b"])


def test_bad_inputs_have_clear_errors(mlp):
    with pytest.raises(dt.ConfigError, match="r must be a positive integer"):
        dt.LoraConfig(r=0)
    with pytest.raises(dt.ConfigError, match="bias must be"):
        dt.LoraConfig(bias="some")
    with pytest.raises(dt.ConfigError, match="init must be one of"):
        dt.LoraConfig(init="bogus")
    model = dt.wrap(mlp, dt.LoraConfig(targets=["fc1"]))
    with pytest.raises(dt.ConfigError, match="already exists"):
        model.add_adapter("default", dt.LoraConfig(targets=["fc1"]))
    for bad in ("a.b", "", "__base__"):
        with pytest.raises(dt.ConfigError, match="adapter name"):
            model.add_adapter(bad, dt.LoraConfig(targets=["fc1"]))
    with pytest.raises(dt.ConfigError, match="already a DeltaModel"):
        dt.wrap(model, dt.LoraConfig(targets=["fc1"]))
    with pytest.raises(dt.ConfigError, match="no adapter named"):
        model.set_adapter("nope")
    before = {n: type(m) for n, m in mlp.named_modules()}
    with pytest.raises(dt.TargetError, match="'fc3' matched no module; closest: fc2, fc1"):
        model.add_adapter("x", dt.LoraConfig(targets=["fc2", "fc3"]))
    assert {n: type(m) for n, m in mlp.named_modules()} == before and list(model.configs) == ["default"]


def test_adapter_names_that_look_like_parameter_names(mlp, tmp_path):
    """Names such as "lora", "weight", "lora_A" must not leak into or corrupt keys (PEFT #2699, #2772)."""
    model = dt.wrap(mlp, dt.LoraConfig(r=2, targets=["fc1"], init="random"), name="weight")
    for name in ("lora", "lora_A", "default", "bias"):
        model.add_adapter(name, dt.LoraConfig(r=2, targets=["fc1", "fc2"], init="random"))
    x = ids(50)
    for name in ("weight", "lora", "lora_A", "bias"):
        model.set_adapter(name)
        with torch.no_grad():
            expected = model(x)
        model.save(tmp_path / name, adapter=name)
        fresh = dt.load(_fresh_mlp(), tmp_path / name, name=name)
        with torch.no_grad():
            assert torch.allclose(fresh(x), expected, atol=1e-6), name


def _fresh_mlp():
    from conftest import MLP

    torch.manual_seed(0)
    return MLP().eval()
