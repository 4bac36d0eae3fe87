"""``deltatune compare`` on causal-LM data: the base model's row first, held-out loss / exact match / forgetting /
tokens-per-second columns with real values, ``qlora`` as an entry, and a row that cannot apply giving its reason.

The model is a tiny random Llama (2 layers, hidden 32) with SmolLM2's tokenizer and chat template, so the whole
comparison takes well under a minute; the task is a small, regular arithmetic set that LoRA learns in a few steps."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from deltatune.cli import main
from deltatune.report import format_table, markdown_table

pytestmark = pytest.mark.usefixtures("one_thread")


def arithmetic(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    return rows


def write(folder: Path, split: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_llm(smollm2, tmp_path_factory) -> str:
    """A random 2-layer Llama over SmolLM2's tokenizer (vocab 49,152), saved as an HF folder (initializer range
    0.2: with the default 0.02 the tied embeddings are too small for any logit to stand out, and nothing trains)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         initializer_range=0.2)  # wide enough embeddings for confident predictions
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llm")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, Path]:
    """(arithmetic data folder: train 64 / test 12 rows, general-text folder of 8 sentences)."""
    root = tmp_path_factory.mktemp("lmdata")
    write(root / "sums", "train", arithmetic(64, 0))
    write(root / "sums", "test", arithmetic(12, 1))
    sentences = ["The film was long but the actors were wonderful.", "Rain fell on the quiet town all night.",
                 "She opened the window and heard the birds.", "The museum closes at six on Sundays.",
                 "A good story needs a reason to care.", "He cooked rice and beans for his friends.",
                 "Trains to the coast leave every hour.", "The old bridge was painted red last year."]
    write(root / "general", "test", [{"text": s, "label": 0} for s in sentences])
    return root / "sums", root / "general"


def test_causal_lm_compare_has_the_base_row_first_and_the_new_columns(tiny_llm, task, tmp_path, capsys):
    data, general = task
    out = tmp_path / "cmp"
    common = ["--model", tiny_llm, "--data", str(data), "--task", "causal-lm", "--prompt-field", "question",
              "--completion-field", "answer", "--max-length", "64", "--max-eval", "12"]
    argv = ["compare", *common, "--methods", "lora,qlora,last-layers", "--k", "5", "--targets", "all-linear",
            "--r", "8", "--lr", "1e-2", "--batch-size", "8", "--max-steps", "16", "--eval-batch-size", "12",
            "--em-rows", "4", "--max-new-tokens", "12", "--forgetting-data", str(general), "--forgetting-rows", "8",
            "--samples", "2", "--threads", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["method"] for r in results] == ["base", "lora", "qlora", "last-layers"]
    base, lora, qlora, layers = results

    # the base row is the base model itself: no training, forgetting 0 by definition, the loss `deltatune eval` gives
    assert base["trainable_params"] == 0 and base["forgetting"] == 0.0 and base["train_time_s"] == 0.0
    assert base["em_rows"] == 4 and 0.0 <= base["exact_match"] <= 1.0 and base["general_loss"] > 5.0
    assert main(["eval", *common, "--split", "test", "--batch-size", "12", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)["test"]
    assert base["heldout_loss"] == pytest.approx(evaluated["loss"], abs=1e-6) and base["heldout_tokens"] == evaluated["tokens"]

    # a trained LoRA row: learned the task (held-out loss well below the base's), real forgetting and throughput
    assert lora["heldout_loss"] < base["heldout_loss"] - 1.0, (base["heldout_loss"], lora["heldout_loss"])
    assert lora["heldout_loss"] == json.loads((out / "lora" / "run.json").read_text())["results"]["test"]["loss"]
    assert isinstance(lora["forgetting"], float) and lora["forgetting"] == pytest.approx(
        lora["general_loss"] - base["general_loss"], abs=1e-12)
    for row in (lora, qlora):
        assert row["trainable_params"] > 0 and row["tokens_per_s"] > 0 and row["peak_rss_bytes"] > 0
        assert row["adapter_bytes"] > 0 and row["em_rows"] == 4 and len(row["samples"]) == 2
    assert json.loads((out / "qlora" / "run.json").read_text())["settings"]["quantize"] == "nf4"

    # an entry that cannot apply to this model is a row with its one-line reason, not a crash
    assert layers["status"] == "n/a" and "--k must be between 1 and 2 (the model has 2 blocks)" in layers["reason"]
    table = printed.out[printed.out.index("method  "):]
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["method", "trainable", "params", "%"] and "exact match" in lines[0]
    assert "forgetting" in lines[0] and "tokens/s" in lines[0] and lines[2].startswith("base ")
    assert any(line.startswith("last-layers") and "n/a: --k must be between" in line for line in lines)
    report = (out / "report.md").read_text()
    assert report.index("| base |") < report.index("| lora |") and "## sample generations (greedy)" in report
    assert (out / "metric_vs_params.png").read_bytes()[:4] == b"\x89PNG"

    # run again: every row is reused, the numbers are the same
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())["results"]
    assert [r["status"] for r in again[:3]] == ["reused"] * 3
    assert [r.get("heldout_loss") for r in again] == [r.get("heldout_loss") for r in results]


def test_lm_table_formats_rows_that_did_not_run():
    rows = [{"method": "base", "trainable_params": 0, "trainable_pct": 0.0, "train_time_s": 0.0, "s_per_step": 0.0,
             "heldout_loss": 1.25, "exact_match": 0.1, "em_rows": 30, "forgetting": 0.0, "peak_rss_bytes": 2 << 30,
             "adapter_bytes": 0, "tokens_per_s": None},
            {"method": "prefix", "status": "n/a", "reason": "prefix tuning needs ..."}]
    text = format_table(rows, "loss")
    assert "0.100 (3/30)" in text and "+0.0000" in text and "\nprefix  n/a: prefix tuning needs ..." in text
    assert "| prefix | n/a: prefix tuning needs ... |" in markdown_table(rows, "loss")


def test_causal_lm_evaluate_scores_the_real_tokens_under_prompt_tuning(llama):
    """Prompt tuning prepends virtual tokens, so its logits are longer than the labels; evaluate scores only the real
    positions, which gives the loss the model itself computes."""
    import deltatune as dt
    from deltatune.train.batching import Encoded, collate
    from deltatune.train.tasks import evaluate

    model = dt.wrap(llama, dt.PromptTuningConfig(num_virtual_tokens=5))
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    labels = [[-100, -100, 7, 8, 9, 10], [-100, 12, 13]]
    data = Encoded([{"input_ids": r} for r in rows], labels)
    result = evaluate(model, data, "causal-lm", pad_id=0, batch_size=2)
    assert result["tokens"] == 6
    with torch.no_grad():
        own = [model(**collate(data, [i], 0, "causal-lm")).loss.item() for i in range(2)]
    assert result["loss"] == pytest.approx((own[0] * 4 + own[1] * 2) / 6, rel=1e-5)
