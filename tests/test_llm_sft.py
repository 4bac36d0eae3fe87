"""End to end on real data: a short LoRA run of SmolLM2 on GSM8K lowers the held-out completion loss below the
base model's, as ``deltatune eval`` reports both (slow: ~1-2 min on 2 CPU threads)."""

from __future__ import annotations

import json

import pytest

from conftest import DATA
from deltatune.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_lora_on_gsm8k_lowers_held_out_completion_loss(smollm2, tmp_path, capsys):
    data = DATA / "gsm8k"
    if not (data / "train.jsonl.gz").is_file():
        pytest.skip("shared GSM8K data not present")
    common = ["--data", str(data), "--prompt-field", "question", "--completion-field", "answer", "--chat-template",
              "--max-length", "192", "--max-eval", "16"]
    run = tmp_path / "run"
    assert main(["train", "--model", smollm2.path, *common, "--method", "lora", "--r", "8", "--alpha", "16",
                 "--targets", "q_proj,v_proj", "--max-train", "48", "--batch-size", "4", "--max-steps", "12",
                 "--lr", "2e-3", "--eval-batch-size", "8", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", smollm2.path, *common, "--split", "test", "--batch-size", "8", "--json"]) == 0
    base = json.loads(capsys.readouterr().out)["test"]
    assert main(["eval", "--adapter", str(run), "--data", str(data), "--split", "test", "--max-eval", "16",
                 "--batch-size", "8", "--json"]) == 0
    tuned = json.loads(capsys.readouterr().out)["test"]
    assert tuned["tokens"] == base["tokens"] > 1000  # the same held-out completion tokens
    assert tuned["loss"] < base["loss"] - 0.1, (base, tuned)
    recorded = json.loads((run / "run.json").read_text())
    assert recorded["results"]["test"]["loss"] == pytest.approx(tuned["loss"], rel=1e-5)
