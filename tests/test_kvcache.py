"""The KV cache under both of its transformers names (``cache`` from 5.25 on, ``past_key_values`` before): prompt and
prefix adapters accept whichever the model takes, with no warning, and ``generate()`` equals exact greedy decoding
on Llama, GPT-2 and a BERT decoder for every prompt-family method."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import tiny_llama
from deltatune.kvcache import cache_arg, output_cache, pop_cache
from virtual_tokens_helpers import MODELS, assert_generate_equals_greedy, batch

P = 3
METHODS = {
    "prompt": lambda: dt.PromptTuningConfig(num_virtual_tokens=P),
    "ptuning": lambda: dt.PTuningConfig(num_virtual_tokens=P, encoder_hidden_size=16),
    "prefix": lambda: dt.PrefixTuningConfig(num_virtual_tokens=P),
    "ptuning-v2": lambda: dt.PTuningV2Config(num_virtual_tokens=P),
}


def tiny_bert_decoder() -> nn.Module:
    from transformers import BertConfig, BertLMHeadModel

    config = BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, is_decoder=True, max_position_embeddings=64)
    torch.manual_seed(0)
    return BertLMHeadModel(config).eval()


class OldNameModel(nn.Module):
    """A model whose forward takes the pre-5.25 name ``past_key_values`` (the old transformers API)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.seen: list[str] = []

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None):
        self.seen.append("past_key_values" if past_key_values is not None else "-")
        name = cache_arg(self.inner)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          inputs_embeds=inputs_embeds, use_cache=use_cache, **{name: past_key_values})


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert-decoder"])
def test_generate_equals_exact_greedy_decoding(arch: str, method: str) -> None:
    base = tiny_bert_decoder() if arch == "bert-decoder" else MODELS[arch][0]()
    model = dt.wrap(base, METHODS[method]()).eval()
    with torch.no_grad():  # a random init starts near zero: make the virtual tokens matter
        for p in model.trainable_parameters():
            p.normal_(0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning for the cache argument's name
        generated = assert_generate_equals_greedy(model, steps=6)
    with torch.no_grad():
        adapted = model(input_ids=generated).logits[:, -generated.shape[1]:]
        with model.disable_adapters():
            plain = model(input_ids=generated).logits
    assert (adapted - plain).abs().max().item() > 1e-3  # the virtual tokens take part


def test_cache_arg_names_what_each_model_takes() -> None:
    from transformers import LlamaModel

    new_api = "cache" in inspect.signature(LlamaModel.forward).parameters
    expected = "cache" if new_api else "past_key_values"
    assert cache_arg(tiny_llama()) == expected
    assert cache_arg(MODELS["bert"][0]()) == expected  # through **kwargs to the BERT backbone
    assert cache_arg(OldNameModel(tiny_llama())) == "past_key_values"
    assert cache_arg(nn.Linear(2, 2)) is None


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_old_argument_name_gets_the_prefix_and_decodes_exactly(method: str) -> None:
    """On a forward that takes ``past_key_values`` the prefix cache goes in under that name, and a manual decode
    step with the returned cache equals the full forward."""
    model = dt.wrap(OldNameModel(tiny_llama()), METHODS[method]()).eval()
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.normal_(0, 1.0)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :5], use_cache=True)
        cache = output_cache(first)
        assert cache.get_seq_length() == P + 5
        rest = model(input_ids=ids[:, 5:], past_key_values=cache, attention_mask=torch.ones(2, 8 + 0)).logits
    assert (torch.cat([first.logits, rest], 1) - full).abs().max().item() <= 1e-5
    if method == "prefix":
        assert model.model.seen[0] == "past_key_values"  # the prefix arrived under the old name on prefill


def test_a_cache_under_either_name_is_one_cache() -> None:
    from transformers.cache_utils import DynamicCache

    c = DynamicCache()
    assert pop_cache({"cache": c}) is c and pop_cache({"past_key_values": c}) is c
    assert pop_cache({"cache": c, "past_key_values": c}) is c and pop_cache({}) is None
    with pytest.raises(dt.ConfigError, match="under one name"):
        pop_cache({"cache": c, "past_key_values": DynamicCache()})


def test_prefix_on_bert_classifier_and_stack_take_the_model_s_name() -> None:
    model = dt.wrap(MODELS["bert"][0](), dt.PTuningV2Config(num_virtual_tokens=P)).eval()
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.normal_(0, 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = model(**batch()).logits
        with model.disable_adapters():
            base = model(**batch()).logits
    assert (out - base).abs().max().item() > 1e-3
