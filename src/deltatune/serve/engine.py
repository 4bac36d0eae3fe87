"""The inference engine behind the server: one base model, a tokenizer, an ``AdapterRegistry``.

``run(kind, items)`` computes one micro-batch: rows of layer adapters (LoRA family, bottleneck adapters) and base
rows go through the model together as one mixed-adapter batch (``adapter_names=``); prompt/prefix adapters, which
cannot share a batch exactly (prompt tuning on a classifier, see ``virtual.py``), run as one sub-batch per
adapter. Classification returns softmax probabilities; completion is one ``generate()`` over left-padded prompts with
per-row settings (``decoding.py``: greedy or seeded temperature/top-p sampling, ``max_tokens``, stop strings, EOS,
streamed text deltas). Each item's failure (an adapter that does not load) is returned in its own slot, so one bad
request never fails the others.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .decoding import RowSampler, RowTracker, Sampling, Sink
from .registry import AdapterRegistry, ServeError

KINDS = ("classify", "complete")
MAX_CHARS_PER_TOKEN = 32  # no tokenizer makes one token of more characters than this in ordinary text


@dataclass
class Item:
    """One row of work: which adapter, the text, and (completions) the decoding settings and a streaming sink."""

    adapter: str
    text: str
    sampling: Sampling = field(default_factory=Sampling)
    sink: Sink | None = None


class Engine:
    def __init__(
        self, base: nn.Module, tokenizer: Any, registry: AdapterRegistry | None = None, task: str | None = None,
        max_length: int = 512, max_tokens: int = 256,
    ) -> None:
        self.tokenizer = tokenizer
        self.counter = copy.deepcopy(tokenizer)  # for the HTTP thread: fast tokenizers must not be shared across threads
        self.registry = registry if registry is not None else AdapterRegistry(base)
        self.task = task or infer_task(base)
        if self.task not in KINDS:
            raise ServeError(f"task must be one of {KINDS}, got {self.task!r}")
        self.max_length = max_length
        self.max_tokens = max_tokens
        self.labels = dict(getattr(getattr(base, "config", None), "id2label", None) or {})
        base.eval()

    # ---- request checks (cheap, done in the HTTP handler) ------------------------------------------------------------
    def check(self, kind: str, adapter: str, text: str, sampling: Sampling | None = None, sink: Sink | None = None) -> Item:
        if kind != self.task:
            other = "/v1/completions" if self.task == "complete" else "/v1/classify"
            raise ServeError(f"this server runs a {'causal LM' if self.task == 'complete' else 'classifier'}; use {other}")
        if not isinstance(text, str) or not text:
            raise ServeError("each input must be a non-empty string")
        self.registry.require(adapter)
        if len(text) > self.max_length * MAX_CHARS_PER_TOKEN:  # cannot fit: refuse before spending time tokenising
            raise ServeError(f"input has {len(text):,} characters; this server accepts at most {self.max_length} tokens "
                             f"(--max-length), far fewer than that")
        count = len(self.counter(text, add_special_tokens=True)["input_ids"])
        if count > self.max_length:
            raise ServeError(f"input has {count} tokens; this server accepts at most {self.max_length} (--max-length)")
        sampling = sampling or Sampling()
        if kind == "complete":
            check_sampling(sampling, self.max_tokens)
        return Item(adapter, text, sampling, sink)

    # ---- batches -------------------------------------------------------------------------------------------------
    def run(self, kind: str, items: list[Item]) -> list[Any]:
        """Results (or exceptions) in the order of ``items``."""
        results: list[Any] = [None] * len(items)
        ready: list[int] = []
        for name in dict.fromkeys(item.adapter for item in items):
            rows = [i for i, item in enumerate(items) if item.adapter == name]
            try:
                self.registry.ensure([name])
                ready += rows
            except Exception as error:
                for i in rows:
                    results[i] = error
        with self.registry.lock, torch.no_grad():
            self.registry.ensure({items[i].adapter for i in ready})  # all of the batch in memory at once
            shared = [i for i in ready if self.registry.batchable(items[i].adapter)]
            groups = [shared] if shared else []
            for name in dict.fromkeys(items[i].adapter for i in ready if i not in shared):
                groups.append([i for i in ready if items[i].adapter == name])
            compute = self._classify if kind == "classify" else self._complete
            for group in groups:
                try:
                    outputs = compute([items[i] for i in group])
                except Exception as error:
                    outputs = [error] * len(group)
                for i, output in zip(group, outputs):
                    results[i] = output
        return results

    def _call(self, items: list[Item], method: str, **kwargs: Any) -> Any:
        model = self.registry.runner()
        names = [item.adapter for item in items]
        if not self.registry.batchable(names[0]):  # a prompt/prefix adapter: its own batch, set as the active one
            model.set_adapter(names[0])
            return getattr(model, method)(**kwargs)
        if hasattr(model, "configs"):
            kwargs["adapter_names"] = [self.registry.row_name(name) for name in names]
        return getattr(model, method)(**kwargs)

    def _classify(self, items: list[Item]) -> list[dict[str, Any]]:
        encoded = self.tokenizer([item.text for item in items], padding=True, return_tensors="pt")
        logits = self._call(items, "forward", **encoded).logits.float()
        probs = logits.softmax(-1)
        return [
            {"label": self.labels.get(int(p.argmax()), str(int(p.argmax()))), "index": int(p.argmax()), "probs": p.tolist()}
            for p in probs
        ]

    def _complete(self, items: list[Item]) -> list[dict[str, Any]]:
        tok = self.tokenizer
        encoded = tok([item.text for item in items], padding=True, padding_side="left", return_tensors="pt")
        encoded = {k: encoded[k] for k in ("input_ids", "attention_mask")}  # no token_type_ids for a causal LM
        settings = [item.sampling for item in items]
        eos = getattr(self.registry.base.generation_config, "eos_token_id", None) or tok.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        tracker = RowTracker(tok, settings, eos_ids, [item.sink for item in items])
        extra: dict[str, Any] = {}
        if any(s.temperature > 0 for s in settings):
            from transformers import LogitsProcessorList

            extra["logits_processor"] = LogitsProcessorList([RowSampler(settings, encoded["input_ids"].device)])
        from transformers import StoppingCriteriaList

        self._call(
            items, "generate", **encoded, max_new_tokens=max(s.max_tokens for s in settings), do_sample=False,
            pad_token_id=tok.pad_token_id, stopping_criteria=StoppingCriteriaList([tracker]), **extra,
        )
        tracker.finish_all()
        prompt_tokens = encoded["attention_mask"].sum(1).tolist()
        return [{**result, "prompt_tokens": int(n)} for result, n in zip(tracker.results(), prompt_tokens)]


def check_sampling(s: Sampling, max_tokens: int) -> None:
    """Refuse decoding settings outside the served ranges (OpenAI's: temperature 0..2, top_p in (0, 1])."""
    if isinstance(s.max_tokens, bool) or not 1 <= s.max_tokens <= max_tokens:
        raise ServeError(f"max_tokens must be between 1 and {max_tokens}, got {s.max_tokens}")
    if not 0 <= s.temperature <= 2:
        raise ServeError(f"temperature must be between 0 (greedy) and 2, got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise ServeError(f"top_p must be in (0, 1], got {s.top_p}")
    if s.seed is not None and not 0 <= s.seed < 2**63:
        raise ServeError(f"seed must be a non-negative 64-bit integer, got {s.seed}")
    if len(s.stop) > 4 or any(not isinstance(x, str) or not x for x in s.stop):
        raise ServeError("stop must be a non-empty string or a list of at most 4 non-empty strings")


def infer_task(model: nn.Module) -> str:
    """"classify" for *ForSequenceClassification models, "complete" for causal LMs."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classify"
    if name.endswith(("ForCausalLM", "LMHeadModel")) or hasattr(model, "generate"):
        return "complete"
    raise ServeError(f"cannot serve {name}: use a sequence-classification model or a causal LM (or pass --task)")
