"""The inference engine behind the server: one base model, a tokenizer, an ``AdapterRegistry``.

``run(kind, items)`` computes one micro-batch: rows of layer adapters (LoRA family, bottleneck adapters) and base
rows go through the model together as one mixed-adapter batch (``adapter_names=``); prompt/prefix adapters, which
cannot share a batch, run as one sub-batch per adapter. Classification returns softmax probabilities; completion
is greedy decoding (left-padded prompts, per-row ``max_tokens``, stop at EOS). Each item's failure (an adapter that
does not load) is returned in its own slot, so one bad request never fails the others.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .registry import AdapterRegistry, ServeError

KINDS = ("classify", "complete")


@dataclass
class Item:
    """One row of work: which adapter, the text, and (completions) how many tokens to generate."""

    adapter: str
    text: str
    max_tokens: int = 0


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
    def check(self, kind: str, adapter: str, text: str, max_tokens: int = 0) -> Item:
        if kind != self.task:
            other = "/v1/completions" if self.task == "complete" else "/v1/classify"
            raise ServeError(f"this server runs a {'causal LM' if self.task == 'complete' else 'classifier'}; use {other}")
        if not isinstance(text, str) or not text:
            raise ServeError("each input must be a non-empty string")
        self.registry.require(adapter)
        count = len(self.counter(text, add_special_tokens=True)["input_ids"])
        if count > self.max_length:
            raise ServeError(f"input has {count} tokens; this server accepts at most {self.max_length} (--max-length)")
        if kind == "complete" and not 1 <= max_tokens <= self.max_tokens:
            raise ServeError(f"max_tokens must be between 1 and {self.max_tokens}, got {max_tokens}")
        return Item(adapter, text, max_tokens)

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
            kwargs["adapter_names"] = names
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
        steps = max(item.max_tokens for item in items)
        out = self._call(
            items, "generate", **encoded, max_new_tokens=steps, do_sample=False, pad_token_id=tok.pad_token_id
        )
        eos = getattr(self.registry.base.generation_config, "eos_token_id", None) or tok.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        results = []
        for item, row in zip(items, out[:, encoded["input_ids"].shape[1]:].tolist()):
            tokens, finish = [], "length"
            for token in row[: item.max_tokens]:
                if token in eos_ids:
                    finish = "stop"
                    break
                tokens.append(token)
            results.append({"text": tok.decode(tokens, skip_special_tokens=True), "tokens": tokens,
                            "finish_reason": finish, "prompt_tokens": int(encoded["attention_mask"][len(results)].sum())})
        return results


def infer_task(model: nn.Module) -> str:
    """"classify" for *ForSequenceClassification models, "complete" for causal LMs."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classify"
    if name.endswith(("ForCausalLM", "LMHeadModel")) or hasattr(model, "generate"):
        return "complete"
    raise ServeError(f"cannot serve {name}: use a sequence-classification model or a causal LM (or pass --task)")
