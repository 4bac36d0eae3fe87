"""Classification data evaluated generatively: ``--task causal-lm --label-words negative,positive`` turns labeled rows
into prompt/completion rows whose completion is the label word, and ``--generate`` scores the first label word."""

from __future__ import annotations

import json

import pytest

from conftest import sst2_slice
from deltatune.cli import main
from deltatune.train.data import DataError, Fields
from deltatune.train.label_words import check_words, first_choice, verbalize


def test_rows_become_prompts_with_the_label_word_as_completion():
    rows = [{"text_a": "A man sleeps.", "text_b": "A person rests.", "label": 0},
            {"text_a": "It rains.", "text_b": "The sun shines.", "label": 1}]
    words = check_words(["entailment", " not_entailment "], 2)
    out = verbalize(rows, Fields(prompt="q", completion="a"), 2, words, "train")
    assert out[0] == {"q": "A man sleeps.\nA person rests.\nAnswer with one word: entailment or not_entailment.\nAnswer:",
                      "a": " entailment"}
    assert out[1]["a"] == " not_entailment"
    named = verbalize([{"text": "ok", "label": "pos"}], Fields(), ["neg", "pos"], ["bad", "good"], "dev")
    assert named[0]["completion"] == " good"  # string labels: words follow the sorted label names


def test_first_choice_is_the_first_whole_label_word_in_any_case():
    words = ["negative", "positive"]
    assert first_choice("Positive, not negative.", words) == "positive"
    assert first_choice("nonpositive", words) is None and first_choice("", words) is None
    assert first_choice("not_entailment", ["entailment", "not_entailment"]) == "not_entailment"


def test_label_words_must_fit_the_classes():
    with pytest.raises(DataError, match="has 3 words but the data has 2 classes; give one word per class, in the "
                                        "order of its labels 0..1"):
        check_words(["a", "b", "c"], 2)
    with pytest.raises(DataError, match="non-empty and distinct"):
        check_words(["yes", "Yes"], 2)


@pytest.mark.usefixtures("one_thread")
def test_base_smollm2_judged_by_generated_label_words_on_sst2(smollm2, tmp_path, capsys):
    data = sst2_slice(tmp_path / "sst2", {"train": 8, "dev": 12})
    predictions = tmp_path / "preds.jsonl"
    assert main(["eval", "--model", smollm2.path, "--data", str(data), "--task", "causal-lm", "--label-words",
                 "negative,positive", "--chat-template", "--split", "dev", "--generate", "--max-new-tokens", "4",
                 "--batch-size", "12", "--predictions", str(predictions), "--json", "--quiet"]) == 0
    metrics = json.loads(capsys.readouterr().out)["dev"]
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    rows = [json.loads(line) for line in (data / "dev.jsonl").read_text().splitlines()]
    assert [r["reference_answer"] for r in records] == [["negative", "positive"][r["label"]] for r in rows]
    assert all(r["answer"] in ("negative", "positive", None) for r in records)
    correct = sum(r["correct"] for r in records)
    assert metrics["generated"] == 12 and metrics["exact_match"] == pytest.approx(correct / 12)
    assert "Answer with one word: negative or positive." in records[0]["prompt"] and metrics["loss"] > 0
