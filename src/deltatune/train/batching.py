"""Tokenised examples, length-grouped seeded batching and dynamic padding.

Classification examples: ``input_ids`` (+ ``token_type_ids``) and an integer label. Causal-LM examples:
``input_ids`` and per-token ``labels`` where prompt tokens are -100 (ignored by the loss). Padding is masked by the
attention mask built from each row's length, never by comparing ids with the pad id (pad may equal eos, a target).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .data import DataError, Fields, label_ids, text_columns
from .sft import encode_sft_row, row_shape

IGNORE = -100


@dataclass
class Encoded:
    """Tokenised rows of one split: features per example plus labels (int per row, or a list per token)."""

    features: list[dict[str, list[int]]]
    labels: list[Any]
    dropped: list[int] = field(default_factory=list)  # causal LM: rows whose completion --max-length cut away
    cut: int = 0  # causal LM: rows whose completion --max-length shortened

    def __len__(self) -> int:
        return len(self.features)

    def length(self, i: int) -> int:
        return len(self.features[i]["input_ids"])


def encode_classification(
    tokenizer: Any, rows: list[dict[str, Any]], fields: Fields, space: list[str] | int, max_length: int, split: str
) -> Encoded:
    if not rows:
        raise DataError(f"the {split} split is empty")
    columns = text_columns(rows, fields, split)
    texts = []
    for column in columns:
        missing = [i for i, r in enumerate(rows) if not isinstance(r.get(column), str)]
        if missing:
            raise DataError(f"{split} row {missing[0]} has no text in field '{column}'")
        texts.append([r[column] for r in rows])
    encoded = tokenizer(*texts, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
    features = [{k: list(encoded[k][i]) for k in keys} for i in range(len(rows))]
    return Encoded(features, label_ids(rows, fields.label, space, split))


def encode_causal_lm(
    tokenizer: Any, rows: list[dict[str, Any]], fields: Fields, max_length: int, split: str, chat: bool = False
) -> Encoded:
    """``text`` rows: every token is a target. Prompt/completion, ``messages`` and Alpaca rows: only completion /
    assistant tokens are (``deltatune.train.sft``); rows left with no target by ``max_length`` are dropped and
    listed in ``dropped``, rows whose completion was shortened counted in ``cut``."""
    if not rows:
        raise DataError(f"the {split} split is empty")
    eos = tokenizer.eos_token_id
    features, labels, dropped, cut = [], [], [], 0
    for number, row in enumerate(rows):
        shape = row_shape(row, fields)
        if shape in ("prompt", "messages", "alpaca"):
            ids, target, status = encode_sft_row(tokenizer, row, fields, shape, chat, max_length, f"{split} row {number}")
            if status == "empty":
                dropped.append(number)
                continue
            cut += status == "cut"
        elif shape == "text":
            ids = tokenizer(row[fields.text], truncation=True, max_length=max_length)["input_ids"]
            if eos is not None and (not ids or ids[-1] != eos) and len(ids) < max_length:
                ids = ids + [eos]
            target = list(ids)
        else:
            raise DataError(
                f"{split} row {number} has fields {sorted(row)}; causal LM rows need '{fields.text}', "
                f"'{fields.prompt}'/'{fields.completion}', 'messages' or 'instruction'/'output' (see --text-field/"
                f"--prompt-field/--completion-field)"
            )
        features.append({"input_ids": ids})
        labels.append(target)
    if not features:
        raise DataError(f"every {split} row lost its completion to --max-length {max_length}; raise --max-length")
    return Encoded(features, labels, dropped, cut)


def train_batches(data: Encoded, batch_size: int, seed: int, epoch: int, group_by_length: bool = True) -> list[list[int]]:
    """The batches (row indices) of one epoch, a pure function of (seed, epoch): shuffled, then, when grouping by
    length, sorted by length inside windows of 64 batches so each batch pads little; batch order shuffled again."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(data), generator=generator).tolist()
    if group_by_length:
        window = batch_size * 64
        order = [
            i for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=data.length, reverse=True)
        ]
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def eval_batches(data: Encoded, batch_size: int) -> list[list[int]]:
    """Length-sorted batches for evaluation (results are put back in row order by the caller)."""
    order = sorted(range(len(data)), key=data.length, reverse=True)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def collate(data: Encoded, indices: list[int], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest row (right padding); labels are -100 on padding for causal LM."""
    width = max(data.length(i) for i in indices)
    batch: dict[str, torch.Tensor] = {}
    for key in data.features[indices[0]]:
        fill = pad_id if key == "input_ids" else 0
        batch[key] = torch.tensor([data.features[i][key] + [fill] * (width - data.length(i)) for i in indices])
    batch["attention_mask"] = torch.tensor([[1] * data.length(i) + [0] * (width - data.length(i)) for i in indices])
    if task == "classification":
        batch["labels"] = torch.tensor([data.labels[i] for i in indices])
    else:
        batch["labels"] = torch.tensor([data.labels[i] + [IGNORE] * (width - len(data.labels[i])) for i in indices])
    return batch
