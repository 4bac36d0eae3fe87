"""Helpers shared by the prompt- and prefix-tuning tests: tiny models, a padded batch, ours-vs-PEFT pairs."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

import deltatune as dt
from conftest import tiny_bert_cls, tiny_gpt2, tiny_llama
from deltatune.methods.virtual_tokens import HOST_NAME

MODELS = {"llama": (tiny_llama, "CAUSAL_LM"), "gpt2": (tiny_gpt2, "CAUSAL_LM"), "bert": (tiny_bert_cls, "SEQ_CLS")}


def module(model: dt.DeltaModel, name: str = "default") -> torch.nn.Module:
    """The prompt/prefix module of adapter ``name``."""
    return getattr(model.model, HOST_NAME).adapters[name]


def make_pair(
    base: torch.nn.Module, ours: Callable[[], dt.DeltaConfig], theirs: Callable[[], object]
) -> tuple[dt.DeltaModel, torch.nn.Module]:
    """(ours, PEFT's) on copies of one base, ours holding PEFT's prompt-encoder weights."""
    import peft

    their_model = peft.get_peft_model(copy.deepcopy(base), theirs()).eval()
    our_model = dt.wrap(base, ours()).eval()
    module(our_model).load_state_dict(their_model.prompt_encoder["default"].state_dict())
    return our_model, their_model


def batch(vocab: int = 128) -> dict[str, torch.Tensor]:
    """Three rows of unequal length (right padding)."""
    ids = torch.randint(0, vocab, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def assert_generate_equals_greedy_and_peft(ours: dt.DeltaModel, theirs: torch.nn.Module, steps: int = 6) -> None:
    """``generate()`` (KV cache) equals step-by-step greedy decoding without a cache, and PEFT's ``generate()``."""
    ids = torch.randint(0, 128, (2, 5))
    mask = torch.ones_like(ids)
    kwargs = {"max_new_tokens": steps, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        generated = ours.generate(input_ids=ids, attention_mask=mask, **kwargs)
        peft_generated = theirs.generate(input_ids=ids, attention_mask=mask, **kwargs)
        seq = ids
        for _ in range(steps):
            logits = ours(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, seq)
    assert torch.equal(generated, peft_generated)
