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


def _peft_predates_cache_rename() -> bool:
    """transformers >= 5.25 names the KV cache ``cache``; HF PEFT up to 0.21.2 only knows ``past_key_values``."""
    import inspect

    import peft
    from packaging.version import Version
    from transformers import LlamaModel

    return "cache" in inspect.signature(LlamaModel.forward).parameters and Version(peft.__version__) <= Version("0.21.2")


PEFT_GENERATE_BROKEN = (
    "HF PEFT <= 0.21.2 under transformers >= 5.25 treats every decode step (cache=) as a prefill and prepends the "
    "virtual tokens again, so its generate() is no oracle; ours is checked against exact greedy decoding instead"
)
PEFT_ENCODER_PREFIX_BROKEN = (
    "HF PEFT <= 0.21.2 under transformers >= 5.25 refuses prefix tuning on encoder classifiers (it looks for "
    "past_key_values in the backbone, now named cache), so it cannot serve as the oracle here"
)
PEFT_PREDATES_CACHE_RENAME = _peft_predates_cache_rename()


def greedy_without_cache(model: dt.DeltaModel, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Exact greedy decoding: each step runs the whole sequence again (no KV cache) and appends the argmax."""
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


GENERATE = {"do_sample": False, "pad_token_id": 0}


def assert_generate_equals_greedy(ours: dt.DeltaModel, steps: int = 6) -> torch.Tensor:
    """``generate()`` (KV cache) equals step-by-step greedy decoding without a cache, token for token."""
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        generated = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, **GENERATE)
    expected = greedy_without_cache(ours, ids, steps)
    assert generated.tolist() == expected.tolist()
    return generated


def assert_generate_equals_peft(ours: dt.DeltaModel, theirs: torch.nn.Module, steps: int = 6) -> None:
    """Ours and PEFT's ``generate()`` give the same tokens (where PEFT's is right: see PEFT_GENERATE_BROKEN)."""
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": steps, **GENERATE}
    with torch.no_grad():
        assert torch.equal(ours.generate(**kwargs), theirs.generate(**kwargs))
