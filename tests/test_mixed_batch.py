"""Mixed-adapter batches: batched (gathered bmm) path vs running each row alone with its adapter set."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import assert_rows_match_single_runs, mixed_and_per_row_grads, tiny_bert_cls, tiny_gpt2, tiny_llama
from deltatune.batching import mixed
from deltatune.layers import DeltaLayer
from deltatune.methods import lora_batched

BASE = "__base__"


def ids(shape=(2, 6), seed=1, vocab=128):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def family(model_factory, targets):
    """One model carrying every batchable method (several ranks and scalings)."""
    model = dt.wrap(model_factory(), dt.LoraConfig(r=4, alpha=8, targets=targets, init="random"), name="lora")
    model.add_adapter("rslora", dt.LoraConfig(r=2, alpha=4, rslora=True, targets=targets, init="random"))
    model.add_adapter("asy", dt.AsyLoraConfig(r=3, targets=targets, init="random"))
    model.add_adapter("dora", dt.DoraConfig(r=2, alpha=4, targets=targets, init="random"))
    model.add_adapter("mora6", dt.MoraConfig(r=2, mora_type=6, targets=targets, init="random"))
    model.add_adapter("mora1", dt.MoraConfig(r=2, mora_type=1, targets=targets, init="random"))
    with torch.no_grad():  # a DoRA magnitude away from ||W0 + sBA|| so g != 1
        for _, host in model.hosts():
            if isinstance(host, DeltaLayer) and "dora" in host.adapters:
                host.adapters["dora"].lora_magnitude_vector.mul_(1.3)
    return model.eval()


def single(model, x, name, **kwargs):
    if name == BASE:
        with model.disable_adapters():
            return model(input_ids=x, **kwargs).logits
    model.set_adapter(name)
    return model(input_ids=x, **kwargs).logits


def no_fallback(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("per-adapter fallback used where the batched path should run")

    monkeypatch.setattr(mixed, "run_each", refuse)


@pytest.mark.parametrize("few_tokens", [0, 10**6], ids=["gathered-factors", "dense-used-factors"])
@pytest.mark.parametrize("factory, targets", [(tiny_llama, ["q_proj", "v_proj", "down_proj"]), (tiny_gpt2, ["c_attn", "c_proj"])])
def test_every_lora_family_method_matches_single_rows(factory, targets, few_tokens, monkeypatch):
    monkeypatch.setattr(lora_batched, "FEW_TOKENS", few_tokens)  # both low-rank paths: per-row bmm and dense
    model = family(factory, targets)
    rows = ["dora", "lora", BASE, "mora6", "asy", "rslora", "mora1", "dora", "lora"]
    x = ids((len(rows), 7))
    no_fallback(monkeypatch)
    with torch.no_grad():
        out = model(input_ids=x, adapter_names=rows).logits
        for i, name in enumerate(rows):
            alone = single(model, x[i : i + 1], name)
            assert (out[i] - alone[0]).abs().max().item() <= 1e-5, (i, name)
        assert (single(model, x[:1], "lora") - single(model, x[:1], BASE)).abs().max() > 1e-3  # adapters matter
    stacks = [h.__dict__.get("_mixed_stacks") for _, h in model.hosts() if isinstance(h, DeltaLayer)]
    assert stacks and all(s is not None and len(s.slots) == 6 for s in stacks)


def test_embedding_lora_and_dora_with_bias(monkeypatch):
    model = dt.wrap(tiny_bert_cls(), dt.DoraConfig(r=2, targets=["query", "dense"], init="random"), name="dora")
    model.add_adapter("emb", dt.LoraConfig(r=3, targets=["word_embeddings"], init="random"))
    model.add_adapter("emb2", dt.LoraConfig(r=5, alpha=3, targets=["word_embeddings", "value"], init="random"))
    with torch.no_grad():
        for _, host in model.hosts():
            if "dora" in host.adapters:
                host.adapters["dora"].lora_magnitude_vector.mul_(0.7)
    model.eval()
    rows = ["emb", "dora", BASE, "emb2", "dora"]
    x = ids((len(rows), 6))
    no_fallback(monkeypatch)
    with torch.no_grad():
        out = model(input_ids=x, adapter_names=rows).logits
        for i, name in enumerate(rows):
            assert (out[i] - single(model, x[i : i + 1], name)[0]).abs().max().item() <= 1e-5, (i, name)


def test_many_adapters_of_different_ranks():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=1, targets=["q_proj", "o_proj"], init="random"), name="a0")
    for k in range(1, 12):
        model.add_adapter(f"a{k}", dt.LoraConfig(r=1 + k % 5, alpha=k + 1, targets=["q_proj", "o_proj"], init="random"))
    model.eval()
    rows = [f"a{k % 12}" for k in range(16)] + [BASE]
    x = ids((len(rows), 5), seed=3)
    with torch.no_grad():
        out = model(input_ids=x, adapter_names=rows).logits
        for i in (0, 5, 11, 15, 16):
            assert (out[i] - single(model, x[i : i + 1], rows[i])[0]).abs().max().item() <= 1e-5


def test_generate_with_mixed_rows_and_beams():
    model = family(tiny_llama, ["q_proj", "v_proj"])
    rows = ["dora", "mora6", BASE, "lora"]
    x = ids((len(rows), 5), seed=4)
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        together = model.generate(input_ids=x, adapter_names=rows, **settings)
        beams = model.generate(input_ids=x[:2], adapter_names=rows[:2], num_beams=2, num_return_sequences=2, **settings)
        for i, name in enumerate(rows):
            if name == BASE:
                with model.disable_adapters():
                    alone = model.generate(input_ids=x[i : i + 1], **settings)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=x[i : i + 1], **settings)
            n = alone.shape[1]  # a row that hit EOS is padded in the batch
            assert torch.equal(together[i, :n], alone[0]) and (together[i, n:] == 0).all(), name
            if i < 2:
                alone_beams = model.generate(input_ids=x[i : i + 1], num_beams=2, num_return_sequences=2, **settings)
                assert torch.equal(beams[2 * i : 2 * i + 2, : alone_beams.shape[1]], alone_beams), name


def test_stacks_are_cached_and_follow_adapter_changes():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, targets=["q_proj"], init="random"), name="a").eval()
    model.add_adapter("b", dt.DoraConfig(r=2, targets=["q_proj"], init="random"))
    host = next(h for _, h in model.hosts() if isinstance(h, DeltaLayer))
    x, rows = ids((2, 4)), ["a", "b"]
    with torch.no_grad():
        first = model(input_ids=x, adapter_names=rows).logits
        stacks = host.__dict__["_mixed_stacks"]
        model(input_ids=x, adapter_names=rows[::-1])
        assert host.__dict__["_mixed_stacks"] is stacks  # same adapters: reused, only the row index changes
        host.adapters["a"].lora_B.weight.mul_(2)  # in-place edit (optimizer step, load): rebuilt
        assert not torch.allclose(model(input_ids=x, adapter_names=rows).logits[0], first[0])
        assert host.__dict__["_mixed_stacks"] is not stacks
        host.weight.add_(0.01)  # base weight edit changes DoRA's g
        after_base_edit = model(input_ids=x, adapter_names=rows).logits
        assert (after_base_edit[1] - single(model, x[1:], "b")[0]).abs().max() <= 1e-5
        model.delete_adapter("a")
        model.add_adapter("c", dt.LoraConfig(r=4, targets=["q_proj"], init="random"))
        out = model(input_ids=x, adapter_names=["c", "b"]).logits
        assert (out[0] - single(model, x[:1], "c")[0]).abs().max() <= 1e-5
        assert set(host.__dict__["_mixed_stacks"].slots) == {"b", "c"}


def test_stacks_follow_edits_of_unused_adapters_and_re_added_names():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, targets=["q_proj"], init="random"), name="a").eval()
    model.add_adapter("b", dt.LoraConfig(r=2, targets=["q_proj"], init="random"))
    host = next(h for _, h in model.hosts() if isinstance(h, DeltaLayer))
    x = ids((2, 4))
    with torch.no_grad():
        model(input_ids=x, adapter_names=["a", BASE])  # stacks hold a and b; b unused
        host.adapters["b"].lora_B.weight.mul_(3)
    assert_rows_match_single_runs(model, x, ["b", "a"])
    for _ in range(3):  # same name, same shapes: freed memory may be reused, the stacks must not be
        model.delete_adapter("a")
        model.add_adapter("a", dt.LoraConfig(r=2, targets=["q_proj"], init="random"))
        assert_rows_match_single_runs(model, x, ["a", "b"])


def test_gradients_through_a_mixed_batch_equal_per_row_gradients():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, targets=["q_proj", "v_proj"], init="random"), name="a")
    model.add_adapter("b", dt.DoraConfig(r=2, targets=["v_proj"], init="random"))
    model.set_adapter(["a", "b"])  # both trainable
    model.eval()
    x, rows = ids((3, 5)), ["a", "b", "a"]
    mixed_grads, single_grads = mixed_and_per_row_grads(model, x, rows)
    assert len(mixed_grads) >= 6
    for n, grad in mixed_grads.items():
        assert torch.allclose(grad, single_grads[n], atol=1e-4, rtol=1e-4), n


def test_active_dropout_falls_back_and_bad_row_counts_are_refused():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, dropout=0.5, targets=["q_proj"], init="random"), name="a")
    model.train()
    out = model(input_ids=ids((2, 4)), adapter_names=["a", BASE]).logits
    assert out.shape == (2, 4, 128)
    model.eval()
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 2 rows"):
        model(input_ids=ids((2, 4)), adapter_names=["a", BASE, "a"])


# ---- prompt / prefix adapters (per-row virtual tokens, batching/virtual.py) -----------------------------------------
def virtual_family(factory, lora_targets):
    """Prefix tuning (P=3), P-tuning v2 (P=5), prompt tuning (V=4), P-tuning (V=2) and a LoRA on one model."""
    model = dt.wrap(factory(), dt.PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16), name="prefix")
    model.add_adapter("v2", dt.PTuningV2Config(num_virtual_tokens=5))
    model.add_adapter("prompt", dt.PromptTuningConfig(num_virtual_tokens=4))
    model.add_adapter("ptuning", dt.PTuningConfig(num_virtual_tokens=2))
    model.add_adapter("lora", dt.LoraConfig(r=2, targets=lora_targets, init="random"))
    return model.eval()


def assert_tail_rows_match(model, x, rows, **kwargs):
    """Row i of the mixed batch ends with exactly the outputs of row i run alone (virtual positions included)."""
    with torch.no_grad():
        out = model(input_ids=x, adapter_names=rows, **kwargs).logits
        for i, name in enumerate(rows):
            alone = single(model, x[i : i + 1], name, **{k: v[i : i + 1] for k, v in kwargs.items()})
            if out.dim() == 2:  # sequence classification: one vector per row
                assert (out[i] - alone[0]).abs().max().item() <= 1e-5, (i, name)
                continue
            n = alone.shape[1]
            assert n >= x.shape[1] and (out[i, -n:] - alone[0]).abs().max().item() <= 1e-5, (i, name)
    return out


@pytest.mark.parametrize("factory, targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])])
def test_decoder_prompt_and_prefix_rows_match_single_rows(factory, targets):
    model = virtual_family(factory, targets)
    rows = ["prefix", "v2", BASE, "lora", "prompt", "ptuning", "prefix", "prompt"]
    x = ids((len(rows), 6), seed=5)
    out = assert_tail_rows_match(model, x, rows)
    assert out.shape[1] == 6 + 4  # the widest input virtual-token count leads every row
    mask = torch.ones_like(x)
    mask[2, :2] = 0  # left padding in one row
    with torch.no_grad():
        padded = model(input_ids=x, attention_mask=mask, adapter_names=rows).logits
    assert (padded[[0, 1, 3, 4, 5, 6, 7]] - out[[0, 1, 3, 4, 5, 6, 7]]).abs().max() <= 1e-5
    with torch.no_grad():
        model.set_adapter("prefix")
        differs = (model(input_ids=x[:1]).logits - single(model, x[:1], BASE)).abs().max()
    assert differs > 1e-3  # the prefix matters


def test_generate_with_prompt_prefix_and_lora_rows():
    model = virtual_family(tiny_llama, ["q_proj", "v_proj"])
    rows = ["prefix", "prompt", BASE, "lora", "v2", "ptuning"]
    x = ids((len(rows), 5), seed=6)
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        together = model.generate(input_ids=x, attention_mask=torch.ones_like(x), adapter_names=rows, **settings)
        for i, name in enumerate(rows):
            if name == BASE:
                with model.disable_adapters():
                    alone = model.generate(input_ids=x[i : i + 1], **settings)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=x[i : i + 1], **settings)
            n = alone.shape[1]
            assert torch.equal(together[i, :n], alone[0]) and (together[i, n:] == 0).all(), name


def test_encoder_prefix_rows_and_equal_prompt_rows_match_single_rows():
    model = virtual_family(tiny_bert_cls, ["query"])
    model.add_adapter("prompt4b", dt.PromptTuningConfig(num_virtual_tokens=4))
    x = ids((6, 7), seed=7)
    assert_tail_rows_match(model, x, ["prefix", "v2", BASE, "lora", "prefix", "v2"])
    assert_tail_rows_match(model, x[:3], ["prompt", "prompt4b", "prompt"])  # equal V: no padding
    types = torch.zeros_like(x)
    assert_tail_rows_match(model, x[:2], ["prompt4b", "prompt"], token_type_ids=types[:2])
    with pytest.raises(dt.ConfigError, match="different numbers of input virtual tokens.*Group the batch"):
        model(input_ids=x[:3], adapter_names=["prompt", "ptuning", BASE])


def test_gradients_reach_each_rows_virtual_tokens():
    model = virtual_family(tiny_llama, ["q_proj"])
    model.set_adapter(["prefix", "prompt"])
    x, rows = ids((3, 5), seed=8), ["prefix", "prompt", "prefix"]
    model(input_ids=x, adapter_names=rows).logits[:, -5:].square().sum().backward()
    mixed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for i, name in enumerate(rows):
        model.set_adapter(name)
        model(input_ids=x[i : i + 1]).logits[:, -5:].square().sum().backward()
    assert len(mixed_grads) >= 4
    for n, p in model.named_parameters():
        if n in mixed_grads:
            assert torch.allclose(mixed_grads[n], p.grad, atol=1e-4, rtol=1e-4), n


def test_training_mixed_batch_with_dropout_gives_each_row_only_its_own_adapter():
    """With active dropout the batch runs each adapter on its own rows: a base row stays exactly the base model's
    output, and rows of adapters with dropout 0 equal their single runs exactly."""
    torch.manual_seed(0)
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, dropout=0.5, init="random", targets=["q_proj", "v_proj"]), "a")
    model.add_adapter("b", dt.LoraConfig(r=4, init="random", targets=["q_proj", "v_proj"]))
    rows = ["a", BASE, "b", "b"]
    x = ids((len(rows), 6))
    model.train()
    with torch.no_grad():
        out = model(input_ids=x, adapter_names=rows).logits
        expected = {name: single(model, x, name) for name in (BASE, "b")}
    torch.testing.assert_close(out[1], expected[BASE][1], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[2:], expected["b"][2:], atol=1e-5, rtol=0)
    assert (out[0] - expected[BASE][0]).abs().max() > 1e-3  # row "a" got its (dropped-out) delta
