"""Generation-based evaluation: batched greedy decoding and exact match of the extracted answers.

Each row's prompt (``deltatune.train.sft.generation_prompt``: the prompt, or the conversation up to the last
assistant reply with the assistant header) is decoded greedily, ``max_new_tokens`` at most, stopping at EOS. Rows
are sorted by length and left-padded into batches (pad tokens masked out by the attention mask, so a row's text
does not depend on its batch). The answer of a text is

- with ``--answer-regex R``: the last match of R (its first group when R has groups);
- by default: the first number after the last ``####`` (GSM8K's answer line; the text there if it holds no
  number), else the last number in the text;

normalised (spaces, ``$`` and thousands separators dropped, a trailing ``.`` removed, ``18.0`` -> ``18``), and
``exact_match`` is the fraction of rows whose generated answer equals the reference's answer.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

import torch

from ..errors import ConfigError
from .data import Fields
from .label_words import first_choice
from .sft import generation_prompt

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize(answer: str) -> str:
    text = answer.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(text)  # exact: a float would turn a long digit string into another number
    except InvalidOperation:
        return text
    if not value.is_finite():
        return text
    return str(int(value)) if value == value.to_integral_value() else str(value.normalize())


def extract_answer(text: str, pattern: str | None = None) -> str | None:
    """The answer in ``text`` (see the module doc), normalised; None when there is none."""
    if pattern is not None:
        matches = list(re.finditer(pattern, text))
        if not matches:
            return None
        last = matches[-1]
        return normalize(last.group(1) if last.re.groups else last.group(0))
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        numbers = NUMBER.findall(tail)
        if numbers:  # '#### 5*' or '#### 5 apples': the number
            return normalize(numbers[0])
        return normalize(tail.splitlines()[0]) if tail else None
    numbers = NUMBER.findall(text)
    return normalize(numbers[-1]) if numbers else None


def compile_answer_regex(pattern: str | None) -> str | None:
    if pattern is None:
        return None
    try:
        re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"--answer-regex {pattern!r} is not a valid regular expression ({error})") from error
    return pattern


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return sorted(set(eos if isinstance(eos, list) else [eos] if eos is not None else []))


class _StepBar:
    """A ``generate`` streamer that advances a progress bar by one for each decoding step (the first ``put`` is the
    prompt)."""

    def __init__(self, bar: Any) -> None:
        self.bar, self.seen_prompt, self.steps = bar, False, 0

    def put(self, value: Any) -> None:
        if self.seen_prompt:
            self.steps += 1
            self.bar.update(1)
        self.seen_prompt = True

    def end(self) -> None:
        self.seen_prompt = False


@torch.no_grad()
def greedy_generate(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16, quiet: bool = False
) -> list[list[int]]:
    """The greedily generated token ids of each prompt (EOS excluded), in the order of ``prompts``; the progress
    bar counts decoding steps (at most ``max_new_tokens`` per batch; a batch that stops early skips the rest)."""
    from tqdm.auto import tqdm

    stops = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    out: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    try:
        with tqdm(total=len(batches) * max_new_tokens, desc=f"generate {len(prompts)} rows", unit="step",
                  disable=quiet, mininterval=1.0) as bar:
            for number, rows in enumerate(batches):
                width = max(len(prompts[i]) for i in rows)
                ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in rows])
                mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in rows])
                generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                           do_sample=False, pad_token_id=pad, eos_token_id=stops or None,
                                           streamer=_StepBar(bar))
                for row, tokens in zip(rows, generated[:, width:].tolist()):
                    cut = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
                    out[row] = tokens[:cut]
                bar.update((number + 1) * max_new_tokens - bar.n)
    finally:
        model.train(was_training)
    return out


def evaluate_generation(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], fields: Fields, chat: bool, max_new_tokens: int,
    batch_size: int = 16, answer_regex: str | None = None, split: str = "test", quiet: bool = False,
    choices: list[str] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, one prediction record per row: prompt, reference, generated, answers, correct); with ``choices``
    (label words) the answer is the first of them in the text (``deltatune.train.label_words.first_choice``)."""
    pattern = compile_answer_regex(answer_regex)
    prompts, references = [], []
    for number, row in enumerate(rows):
        ids, reference = generation_prompt(tokenizer, row, fields, chat, f"{split} row {number}")
        prompts.append(ids)
        references.append(reference)
    generated = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, quiet)
    records = []
    for number, (ids, reference, tokens) in enumerate(zip(prompts, references, generated)):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if choices:
            wanted, got = first_choice(reference, choices), first_choice(text, choices)
        else:
            wanted = extract_answer(reference, pattern)
            wanted = normalize(reference) if wanted is None else wanted
            got = extract_answer(text, pattern)
        records.append({"split": split, "index": number, "prompt": tokenizer.decode(ids), "reference": reference,
                        "generated": text, "reference_answer": wanted, "answer": got, "correct": got == wanted,
                        "generated_tokens": len(tokens)})
    correct = sum(r["correct"] for r in records)
    metrics = {"exact_match": correct / max(len(records), 1), "generated": len(records),
               "generated_tokens_mean": sum(r["generated_tokens"] for r in records) / max(len(records), 1)}
    return metrics, records
