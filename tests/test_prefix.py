"""Prefix tuning and P-tuning v2: equality with PEFT (outputs, files both ways), KV-cache generation against
step-by-step greedy decoding without the cache, padding, gradients, prefix dropout, GQA shapes, LoRA + prefix."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from conftest import tiny_bert_cls, tiny_gpt2, tiny_llama
from deltatune.kvcache import output_cache
from deltatune.methods.virtual_tokens import HOST_NAME
from virtual_tokens_helpers import (
    MODELS,
    PEFT_ENCODER_PREFIX_BROKEN,
    PEFT_GENERATE_BROKEN,
    PEFT_PREDATES_CACHE_RENAME,
    assert_generate_equals_greedy,
    assert_generate_equals_peft,
    batch,
    make_pair,
    module,
)

peft = pytest.importorskip("peft")

P = 3
OURS = {
    "prefix": lambda: dt.PrefixTuningConfig(num_virtual_tokens=P, encoder_hidden_size=16),
    "v2": lambda: dt.PTuningV2Config(num_virtual_tokens=P),
}
THEIRS = {
    "prefix": lambda t: peft.PrefixTuningConfig(task_type=t, num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=16),
    "v2": lambda t: peft.PrefixTuningConfig(task_type=t, num_virtual_tokens=P),
}


def pair(base: torch.nn.Module, method: str, task: str) -> tuple[dt.DeltaModel, torch.nn.Module]:
    return make_pair(base, OURS[method], lambda: THEIRS[method](task))


@pytest.mark.parametrize("method", list(OURS))
@pytest.mark.parametrize("arch", list(MODELS))
def test_outputs_equal_peft(arch: str, method: str) -> None:
    if arch == "bert" and PEFT_PREDATES_CACHE_RENAME:
        pytest.skip(PEFT_ENCODER_PREFIX_BROKEN)
    make, task = MODELS[arch]
    ours, theirs = pair(make(), method, task)
    inputs = batch()
    with torch.no_grad():
        a, b = ours(**inputs).logits, theirs(**inputs).logits
    assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-5
    assert ours.count_parameters()[0] == theirs.get_nb_trainable_parameters()[0]
    # the prefix really changes the output
    with torch.no_grad(), ours.disable_adapters():
        assert (ours(**inputs).logits - a).abs().max().item() > 1e-3


@pytest.mark.skipif(PEFT_PREDATES_CACHE_RENAME, reason=PEFT_ENCODER_PREFIX_BROKEN)
def test_minilm_classification_equals_peft(minilm_cls) -> None:
    ours, theirs = pair(minilm_cls, "v2", "SEQ_CLS")
    inputs = batch(30000)
    with torch.no_grad():
        assert (ours(**inputs).logits - theirs(**inputs).logits).abs().max().item() <= 1e-5
    assert ours.configs["default"].modules_to_save == ["classifier"]


def test_gqa_prefix_shapes_follow_key_value_heads() -> None:
    model = dt.wrap(tiny_llama(), dt.PTuningV2Config(num_virtual_tokens=P))
    config = model.configs["default"]
    assert (config.num_attention_heads, config.token_dim, config.num_layers) == (2, 16, 2)  # 2 kv heads x 8
    assert module(model).embedding.weight.shape == (P, 2 * 2 * 16)


@pytest.mark.parametrize("method", list(OURS))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_equals_greedy_without_cache(arch: str, method: str) -> None:
    make, task = MODELS[arch]
    ours, _ = pair(make(), method, task)
    assert_generate_equals_greedy(ours)


@pytest.mark.parametrize("method", list(OURS))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.skipif(PEFT_PREDATES_CACHE_RENAME, reason=PEFT_GENERATE_BROKEN)
def test_generate_equals_peft(arch: str, method: str) -> None:
    make, task = MODELS[arch]
    ours, theirs = pair(make(), method, task)
    assert_generate_equals_peft(ours, theirs)


def test_manual_decoding_with_returned_cache_equals_full_forward() -> None:
    model = dt.wrap(tiny_llama(), dt.PrefixTuningConfig(num_virtual_tokens=P)).eval()
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :5], use_cache=True)
        assert output_cache(first).get_seq_length() == P + 5
        rest = model(input_ids=ids[:, 5:], past_key_values=output_cache(first), attention_mask=torch.ones(2, 8)).logits
    assert (torch.cat([first.logits, rest], 1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_unpadded_runs(arch: str, side: str) -> None:
    make, _ = MODELS[arch]
    model = dt.wrap(make(), dt.PrefixTuningConfig(num_virtual_tokens=P)).eval()
    rows = [torch.randint(0, 128, (n,)) for n in (6, 3, 5)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():  # per-token last hidden states (BERT's pooler reads position 0, a pad when left-padded)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        for i, r in enumerate(rows):
            alone = model(input_ids=r[None], output_hidden_states=True).hidden_states[-1]
            got = out.hidden_states[-1][i][mask[i].bool()]
            assert (got - alone[0]).abs().max().item() <= 1e-5
        if side == "right":
            assert (out.logits[0] - model(input_ids=rows[0][None]).logits[0]).abs().max().item() <= 1e-5


def test_left_padded_generate_matches_unpadded_rows() -> None:
    model = dt.wrap(tiny_gpt2(), dt.PTuningV2Config(num_virtual_tokens=P)).eval()
    short, long = torch.randint(1, 128, (3,)), torch.randint(1, 128, (6,))
    ids = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), short]), long])
    mask = (torch.arange(6)[None] >= torch.tensor([[3], [0]])).long()
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        both = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, 6:]
        for row, seq in ((0, short), (1, long)):
            alone = model.generate(input_ids=seq[None], attention_mask=torch.ones(1, len(seq), dtype=torch.long), **kwargs)
            assert torch.equal(both[row], alone[0, len(seq):])


@pytest.mark.parametrize("method", list(OURS))
def test_gradients_reach_only_prefix_and_head(method: str) -> None:
    model = dt.wrap(tiny_bert_cls(), OURS[method]()).train()
    model(**batch(), labels=torch.tensor([0, 1, 2])).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert all(HOST_NAME in n or "classifier.copies.default" in n for n in with_grad)
    expected = {"embedding.weight"} | ({"transform.0.weight", "transform.2.weight"} if method == "prefix" else set())
    assert expected <= {n.split("default.")[-1] for n in with_grad if HOST_NAME in n}
    assert any("classifier.copies.default" in n for n in with_grad)


def test_prefix_dropout_only_in_training() -> None:
    model = dt.wrap(tiny_llama(), dt.PTuningV2Config(num_virtual_tokens=P, dropout=0.5))
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        model.train()
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
        model.eval()
        c, d = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert (a - b).abs().max() > 1e-4 and torch.equal(c, d)


@pytest.mark.parametrize("method", list(OURS))
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_files_load_both_ways(tmp_path, arch: str, method: str) -> None:
    make, task = MODELS[arch]
    ours, theirs = pair(make(), method, task)
    inputs = batch()
    with torch.no_grad():
        reference = ours(**inputs).logits
    ours.save(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(mine) == sorted(peft_file) and mine["prompt_embeddings"].shape == peft_file["prompt_embeddings"].shape
    assert all((mine[k] - peft_file[k]).abs().max() <= 1e-6 for k in mine)
    data = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert data["peft_type"] == "PREFIX_TUNING" and data["prefix_projection"] == (method == "prefix")
    peft_loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    from_peft = dt.load(make(), tmp_path / "theirs").eval()
    again = dt.load(make(), tmp_path / "ours").eval()
    assert type(from_peft.configs["default"]) is type(OURS[method]())
    with torch.no_grad():
        if arch == "bert" and PEFT_PREDATES_CACHE_RENAME:  # PEFT_ENCODER_PREFIX_BROKEN: compare what PEFT read
            assert torch.equal(peft_loaded.prompt_encoder["default"].embedding.weight, mine["prompt_embeddings"])
        else:
            assert (peft_loaded(**inputs).logits - reference).abs().max().item() <= 1e-5
        assert (from_peft(**inputs).logits - reference).abs().max().item() <= 1e-5
        assert (again(**inputs).logits - reference).abs().max().item() <= 1e-6
    again.save(tmp_path / "again")
    assert all(torch.equal(v, load_file(tmp_path / "again" / "adapter_model.safetensors")[k]) for k, v in mine.items())


def test_lora_plus_prefix_equals_merged_lora_with_same_prefix() -> None:
    base = tiny_llama()
    model = dt.wrap(base, dt.LoraConfig(r=4, init="random", targets=["q_proj", "v_proj"]), name="lora")
    model.add_adapter("prefix", dt.PrefixTuningConfig(num_virtual_tokens=P))
    model.set_adapter(["lora", "prefix"])
    inputs = batch()
    with torch.no_grad():
        both = model(**inputs).logits
        model.set_adapter("lora")
        merged = copy.deepcopy(model).merge_and_unload()
        reference = dt.wrap(merged, dt.PrefixTuningConfig(num_virtual_tokens=P)).eval()
        module(reference).load_state_dict(module(model, "prefix").state_dict())
        assert (reference(**inputs).logits - both).abs().max().item() <= 1e-5
    model.set_adapter(["lora", "prefix"])
    with pytest.warns(UserWarning, match="cannot be merged"):
        assert model.merge(skip_unmergeable=True) == ["prefix"]
    with torch.no_grad():
        assert (model(**inputs).logits - both).abs().max().item() <= 1e-5


def test_model_without_a_kv_cache_is_refused() -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=1, n_heads=4))
    with pytest.raises(dt.TargetError, match="DistilBertForSequenceClassification takes no KV cache"):
        dt.wrap(model, dt.PrefixTuningConfig(num_virtual_tokens=P))
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(dt.ConfigError, match="takes no targets"):
        dt.PrefixTuningConfig(targets=["q_proj"])


def test_mixed_batches_with_prefix_rows_run_per_row() -> None:
    """Prefix rows share a mixed batch (exactness is tested in tests/test_mixed_batch.py)."""
    model = dt.wrap(tiny_llama(), dt.PrefixTuningConfig(num_virtual_tokens=P)).eval()
    x = torch.randint(0, 128, (2, 4))
    with torch.no_grad():
        out = model(input_ids=x, adapter_names=["default", "__base__"]).logits
        with model.disable_adapters():
            base = model(input_ids=x[1:]).logits
    assert out.shape == (2, 4, 128) and (out[1] - base[0]).abs().max() <= 1e-5
