"""SFT rows with SmolLM2's tokenizer: completion-only labels for prompt/completion, messages and Alpaca rows,
pad == eos batches, and rows whose completion --max-length cuts away."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deltatune.train.batching import IGNORE, collate, encode_causal_lm
from deltatune.train.data import DataError, Fields, detect_task
from deltatune.train.models import load_model, load_tokenizer
from deltatune.train.run import report_truncation
from deltatune.train.tasks import evaluate

QA = {"q": "What is 2+2?", "a": "2+2 = 4\n#### 4"}
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"},
                     {"role": "assistant", "content": "Paris."}]}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(smollm2):
    return load_tokenizer(smollm2.path)


def targets(tok, encoded, i=0) -> str:
    return tok.decode([t for t in encoded.labels[i] if t != IGNORE])


def context(tok, encoded, i=0) -> str:
    ids, labels = encoded.features[i]["input_ids"], encoded.labels[i]
    return tok.decode([t for t, label in zip(ids, labels) if label == IGNORE])


def test_prompt_completion_plain_text_plus_eos(tok):
    encoded = encode_causal_lm(tok, [QA], Fields(prompt="q", completion="a"), 64, "train")
    prompt = tok(QA["q"])["input_ids"]
    completion = tok(QA["a"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert encoded.features[0]["input_ids"] == prompt + completion
    assert encoded.labels[0] == [IGNORE] * len(prompt) + completion
    assert targets(tok, encoded) == "2+2 = 4\n#### 4<|im_end|>"


def test_prompt_completion_with_chat_template(tok):
    encoded = encode_causal_lm(tok, [QA], Fields(prompt="q", completion="a"), 128, "train", chat=True)
    rendered = tok.apply_chat_template([{"role": "user", "content": QA["q"]}, {"role": "assistant", "content": QA["a"]}],
                                       tokenize=False)
    assert tok.decode(encoded.features[0]["input_ids"]) == rendered
    assert context(tok, encoded).endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert targets(tok, encoded) == "2+2 = 4\n#### 4<|im_end|>\n"


def test_messages_rows_train_on_every_assistant_reply_only(tok):
    encoded = encode_causal_lm(tok, [CHAT], Fields(), 128, "train")
    assert tok.decode(encoded.features[0]["input_ids"]) == tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert targets(tok, encoded) == "Hello!<|im_end|>\nParis.<|im_end|>\n"
    assert context(tok, encoded) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                     "<|im_start|>assistant\n<|im_start|>user\nCapital of France?<|im_end|>\n"
                                     "<|im_start|>assistant\n")
    assert detect_task([CHAT], Fields()) == "causal-lm"


def test_alpaca_rows_plain_and_chat(tok):
    plain = encode_causal_lm(tok, [ALPACA], Fields(), 128, "train")
    assert context(tok, plain).endswith("### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert targets(tok, plain) == "5<|im_end|>"
    chat = encode_causal_lm(tok, [ALPACA], Fields(), 128, "train", chat=True)
    assert context(tok, chat).endswith("<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n")
    assert targets(tok, chat) == "5<|im_end|>\n"
    assert detect_task([ALPACA], Fields()) == "causal-lm"


def test_pad_equals_eos_loss_counts_completion_tokens_only(tok, smollm2):
    """A batch padded with eos (= pad): the completions' own eos stays a target, padding is masked; the evaluated
    loss equals the cross-entropy over the completion tokens of each row run alone."""
    rows = [{"q": "Hi", "a": "Hello"}, QA, {"q": "Name a colour.", "a": "Blue, like the sky on a clear day."}]
    encoded = encode_causal_lm(tok, rows, Fields(prompt="q", completion="a"), 64, "train")
    batch = collate(encoded, [0, 1, 2], tok.pad_token_id, "causal-lm")
    n0 = len(encoded.features[0]["input_ids"])
    assert batch["input_ids"][0, n0 - 1] == batch["input_ids"][0, -1] == tok.eos_token_id  # own eos, then padding
    assert batch["labels"][0, n0 - 1] == tok.eos_token_id and batch["attention_mask"][0, n0 - 1] == 1
    assert (batch["labels"][0, n0:] == IGNORE).all() and (batch["attention_mask"][0, n0:] == 0).all()
    model, _ = load_model(smollm2.path, "causal-lm", pad_id=tok.pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for features, labels in zip(encoded.features, encoded.labels):
            logits = model(input_ids=torch.tensor([features["input_ids"]])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            total += F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum").item()
            count += int((target != IGNORE).sum())
    result = evaluate(model, encoded, "causal-lm", tok.pad_token_id, batch_size=3)
    assert result["tokens"] == count == sum(len(tok(r["a"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)
    assert math.isclose(result["loss"], total / count, rel_tol=1e-5)


def test_rows_whose_completion_is_cut_away_are_dropped_and_reported(tok, capsys):
    long_prompt = {"q": "word " * 40, "a": "done"}
    rows = [QA, long_prompt, {"q": "Hi", "a": "Hello there, how are you doing today? " * 3}]
    encoded = encode_causal_lm(tok, rows, Fields(prompt="q", completion="a"), 24, "train")
    assert encoded.dropped == [1] and encoded.cut == 1 and len(encoded) == 2
    assert all(len(f["input_ids"]) <= 24 for f in encoded.features)
    info: dict = {}
    report_truncation(encoded, "train", 24, info)
    assert info["truncated"] == {"train": {"dropped": [1], "cut": 1}}
    err = capsys.readouterr().err
    assert "1 train rows dropped: --max-length 24 cuts away their whole completion (rows 1 of" in err
    with pytest.raises(DataError, match="every train row lost its completion to --max-length 4"):
        encode_causal_lm(tok, [long_prompt], Fields(prompt="q", completion="a"), 4, "train")
