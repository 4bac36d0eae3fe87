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


def trained_peft_file(base, folder, init: str, targets: list[str], **extra) -> torch.Tensor:
    """A PEFT PiSSA/OLoRA model whose A, B moved from their init (as training would), saved unconverted; returns
    the logits PEFT's own model gives."""
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, **extra))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        theirs.save_pretrained(folder)  # A, B relative to PEFT's residual base, as PEFT writes them
        return theirs(input_ids=ids()).logits


# (PEFT's own OLoRA model on GPT-2's Conv1D fails in its forward, so there is no oracle for that pair)
@pytest.mark.parametrize(("arch", "init"), [("bert", "pissa"), ("bert", "olora"), ("gpt2", "pissa")])
def test_unconverted_peft_file_loads_with_peft_s_outputs(tmp_path, arch, init):
    """PEFT re-derives the residual base when it loads such a file; we load the equivalent plain rank-2r LoRA on the
    untouched base: the same outputs as PEFT's model (and PEFT's reload), the base weights unchanged, and the file we
    save is that plain LoRA, which PEFT loads with the same outputs."""
    from transformers import BertConfig, BertForSequenceClassification

    from conftest import tiny_gpt2

    if arch == "bert":
        torch.manual_seed(0)
        base = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=2, num_attention_heads=4)).eval()
        targets, extra = ["query", "value"], {"use_rslora": True}
    else:
        base, targets, extra = tiny_gpt2(), ["c_attn"], {"fan_in_fan_out": True}
    expected = trained_peft_file(base, tmp_path / "peft", init, targets, **extra)
    pristine = copy.deepcopy(base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        peft_reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
        assert (peft_reloaded(input_ids=ids()).logits - expected).abs().max() <= 1e-5
        loaded = dt.load(base, tmp_path / "peft").eval()
        assert (loaded(input_ids=ids()).logits - expected).abs().max() <= 1e-5
        with loaded.disable_adapters():
            assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items() if "lora" not in k)
    config = loaded.configs["default"]
    assert (config.init, config.r, config.rslora) == ("kaiming", 8, arch == "bert")
    loaded.save(tmp_path / "ours")
    data = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert data["init_lora_weights"] is True and data["r"] == 8
    with torch.no_grad():
        from_ours = peft.PeftModel.from_pretrained(pristine, tmp_path / "ours").eval()
        assert (from_ours(input_ids=ids()).logits - expected).abs().max() <= 1e-5


def test_randomized_pissa_file_is_refused_with_the_recipe(tmp_path):
    base = bert()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query"], init_lora_weights="pissa_niter_4"))
    theirs.save_pretrained(tmp_path / "peft")
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(dt.ConfigError, match="randomized SVD.*path_initial_model_for_weight_conversion"):
        dt.load(base, tmp_path / "peft")
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
