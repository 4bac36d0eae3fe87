"""Generation-based evaluation: answer extraction, batched greedy decoding, ``deltatune eval --generate`` on a
hand-made set with SmolLM2, and base-model evaluation (no --adapter)."""

from __future__ import annotations

import json

import pytest

from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.train.data import Fields
from deltatune.train.generation import compile_answer_regex, extract_answer, greedy_generate
from deltatune.train.models import load_model, load_tokenizer
from deltatune.train.sft import generation_prompt

ROWS = [  # greedy SmolLM2 says "2 + 3 = 5", "A spider has 8 legs." and "The capital of France is Paris."
    {"question": "What is 2 + 3? Reply with just the number.", "answer": "2 + 3 = 5\n#### 5"},
    {"question": "How many legs does a spider have? Reply with just the number.", "answer": "#### 8"},
    {"question": "What is the capital of France?", "answer": "#### Lyon"},
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text, pattern, answer", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", None, "72"),
    ("so the total is $1,200.00.", None, "1200"),
    ("#### 18.0", None, "18"),
    ("#### 5* 2 = 10", None, "5"),
    ("#### Paris", None, "Paris"),
    ("so 12500000000000000000000000000000000000001 it is", None, "12500000000000000000000000000000000000001"),
    ("ratio 0.50", None, "0.5"),
    ("It is 3, then 4.5 and finally -7.", None, "-7"),
    ("no number here", None, None),
    ("The answer is (B). Final: (C)", r"\(([A-D])\)", "C"),
    ("label: positive", r"positive|negative", "positive"),
])
def test_extract_answer(text, pattern, answer):
    assert extract_answer(text, pattern) == answer


def test_bad_answer_regex_is_refused():
    with pytest.raises(ConfigError, match="--answer-regex '\\(' is not a valid regular expression"):
        compile_answer_regex("(")


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hand")
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return folder


def test_eval_generate_exact_match_on_hand_made_set(smollm2, hand_made, tmp_path, capsys):
    predictions = tmp_path / "predictions.jsonl"
    code = main(["eval", "--model", smollm2.path, "--data", str(hand_made), "--split", "test", "--prompt-field",
                 "question", "--completion-field", "answer", "--chat-template", "--generate", "--max-new-tokens", "8",
                 "--predictions", str(predictions), "--json", "--quiet"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)["test"]
    assert metrics["exact_match"] == pytest.approx(2 / 3) and metrics["generated"] == 3
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["correct"] for r in records] == [True, True, False]
    assert [r["answer"] for r in records] == ["5", "8", None] and records[2]["reference_answer"] == "Lyon"
    assert records[0]["prompt"].endswith("<|im_start|>user\nWhat is 2 + 3? Reply with just the number.<|im_end|>\n"
                                         "<|im_start|>assistant\n")
    assert "Paris" in records[2]["generated"]
    # left-padded batch == each row alone
    tok = load_tokenizer(smollm2.path)
    model, _ = load_model(smollm2.path, "causal-lm", pad_id=tok.pad_token_id)
    prompts = [generation_prompt(tok, r, Fields(prompt="question", completion="answer"), True, "t")[0] for r in ROWS]
    alone = greedy_generate(model, tok, prompts, 8, batch_size=1, quiet=True)
    assert [tok.decode(t, skip_special_tokens=True) for t in alone] == [r["generated"] for r in records]


def test_eval_without_adapter_evaluates_the_base_model(smollm2, hand_made, capsys):
    code = main(["eval", "--model", smollm2.path, "--data", str(hand_made), "--split", "test", "--prompt-field",
                 "question", "--completion-field", "answer", "--json"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)["test"]
    tok = load_tokenizer(smollm2.path)
    assert metrics["tokens"] == sum(len(tok(r["answer"], add_special_tokens=False)["input_ids"]) + 1 for r in ROWS)
    assert 0.5 < metrics["loss"] < 10
