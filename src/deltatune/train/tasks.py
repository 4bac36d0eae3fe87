"""Tasks and their metrics: classification (accuracy, F1, Matthews correlation) and causal LM (loss, perplexity).

F1 is the positive-class F1 for two classes and the macro average otherwise; Matthews correlation uses the
multi-class form ``(c*s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2))`` (equal to the binary MCC).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .batching import Encoded, collate, eval_batches
from .lm_fast import fused_blocker, fused_causal_lm_loss
from .models import unwrap_hf

TASKS = ("classification", "causal-lm")
CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc")
LM_METRICS = ("loss", "perplexity")
LOWER_IS_BETTER = {"loss", "perplexity"}


def confusion(predictions: list[int], labels: list[int], num_classes: int) -> list[list[int]]:
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for p, t in zip(predictions, labels):
        matrix[t][p] += 1
    return matrix


def f1_score(predictions: list[int], labels: list[int], num_classes: int) -> float:
    matrix = confusion(predictions, labels, num_classes)
    scores = []
    for k in range(num_classes):
        tp = matrix[k][k]
        predicted = sum(matrix[t][k] for t in range(num_classes))
        actual = sum(matrix[k])
        scores.append(0.0 if tp == 0 else 2 * tp / (predicted + actual))
    return scores[1] if num_classes == 2 else sum(scores) / num_classes


def matthews(predictions: list[int], labels: list[int], num_classes: int) -> float:
    matrix = confusion(predictions, labels, num_classes)
    s = len(labels)
    c = sum(matrix[k][k] for k in range(num_classes))
    p = [sum(matrix[t][k] for t in range(num_classes)) for k in range(num_classes)]
    t = [sum(matrix[k]) for k in range(num_classes)]
    denominator = math.sqrt((s * s - sum(x * x for x in p)) * (s * s - sum(x * x for x in t)))
    return 0.0 if denominator == 0 else (c * s - sum(a * b for a, b in zip(p, t))) / denominator


def classification_metrics(predictions: list[int], labels: list[int], num_classes: int) -> dict[str, float]:
    correct = sum(int(p == t) for p, t in zip(predictions, labels))
    return {
        "accuracy": correct / max(len(labels), 1),
        "f1": f1_score(predictions, labels, num_classes),
        "mcc": matthews(predictions, labels, num_classes),
    }


def better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if metric in LOWER_IS_BETTER else new > old


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: Encoded,
    task: str,
    pad_id: int,
    batch_size: int = 64,
    num_classes: int = 2,
    autocast: bool = False,
    keep_logits: bool = False,
    fused: bool = True,
) -> dict[str, Any]:
    """Metrics of ``model`` on ``data``; ``predictions`` (and ``logits`` when asked) come back in row order.
    Causal LM: the loss comes from ``lm_fast``'s fused head + cross-entropy (no [B, T, V] logits) when ``fused``
    and the model allows it (``fused_blocker``), else from the full logits; the two agree to float rounding."""
    was_training = model.training
    model.eval()
    total_loss, total_count = 0.0, 0
    predictions: list[int] = [0] * len(data)
    logits_out: list[list[float]] = [[] for _ in range(len(data))]
    hf = unwrap_hf(model)
    fused = fused and task == "causal-lm" and fused_blocker(hf) is None
    try:
        for indices in eval_batches(data, batch_size):
            batch = collate(data, indices, pad_id, task)
            if fused:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    total_loss += fused_causal_lm_loss(model, hf, batch, reduction="sum").item()
                total_count += int((batch["labels"][:, 1:] != -100).sum())
                continue
            labels = batch.pop("labels")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(**batch).logits.float()
            if task == "classification":
                total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
                total_count += len(indices)
                for row, index in enumerate(indices):
                    predictions[index] = int(logits[row].argmax())
                    if keep_logits:
                        logits_out[index] = logits[row].tolist()
            else:
                logits = logits[:, -labels.shape[1]:]  # prompt tuning prepends virtual tokens: score the real ones
                shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
                targets = labels[:, 1:].reshape(-1)
                total_loss += F.cross_entropy(shifted, targets, ignore_index=-100, reduction="sum").item()
                total_count += int((targets != -100).sum())
    finally:
        model.train(was_training)
    loss = total_loss / max(total_count, 1)
    if task == "classification":
        result: dict[str, Any] = {"loss": loss, **classification_metrics(predictions, data.labels, num_classes)}
        result["predictions"] = predictions
        if keep_logits:
            result["logits"] = logits_out
        return result
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": total_count}
