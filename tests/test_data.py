"""Data loading, subsets, tokenisation, batching and metrics (deltatune.train.data / batching / tasks)."""

from __future__ import annotations

import csv
import gzip
import json
import math
import random
from pathlib import Path

import pytest

from conftest import sst2_rows
from deltatune.train.batching import collate, encode_causal_lm, encode_classification, eval_batches, train_batches
from deltatune.train.data import (
    DataError,
    Fields,
    detect_task,
    find_split_files,
    is_labeled,
    label_ids,
    label_space,
    load_splits,
    read_rows,
    subset,
    text_columns,
)
from deltatune.train.tasks import classification_metrics, f1_score, matthews

ROWS = [{"text": "good movie", "label": 1}, {"text": "bad, \"awful\"\tfilm", "label": 0}, {"text": "fine", "label": 1}]


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)



# ---- files -------------------------------------------------------------------------------------------------------
def write_split(path: Path, rows: list[dict]) -> None:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if name.endswith(".gz"):
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            path.write_text(text, encoding="utf-8")
    else:
        delimiter = "\t" if name.endswith(".tsv") else ","
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter,
                                    quoting=csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE, escapechar="\\")
            writer.writeheader()
            writer.writerows(rows)


@pytest.mark.parametrize("ext", [".jsonl", ".jsonl.gz", ".csv"])
def test_read_rows_round_trips_each_format(tmp_path, ext):
    path = tmp_path / f"train{ext}"
    write_split(path, ROWS)
    rows = read_rows(path)
    assert [r["text"] for r in rows] == [r["text"] for r in ROWS]
    assert label_ids(rows, "label", 2, "train") == [1, 0, 1]  # csv labels arrive as text and are parsed


def test_tsv_and_string_labels(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("text\tlabel\nnice\tpos\nugly\tneg\nok\tpos\n", encoding="utf-8")
    rows = read_rows(path)
    space = label_space(rows, "label")
    assert space == ["neg", "pos"]
    assert label_ids(rows, "label", space, "train") == [1, 0, 1]
    with pytest.raises(DataError, match="not among the training labels"):
        label_ids([{"text": "x", "label": "meh"}], "label", space, "dev")


def test_parquet_reads_or_says_what_to_install(tmp_path):
    path = tmp_path / "train.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(DataError, match="pyarrow"):
            read_rows(path)
        return
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert read_rows(path) == ROWS


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    """IMDb reviews contain U+2028 / U+0085 unescaped; str.splitlines() would cut such a row in two."""
    rows = [{"text": "one\u2028two\x85three\x1cfour\r", "label": 1}, {"text": "plain", "label": 0}]
    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows))
    assert read_rows(path) == rows


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        read_rows(path)


def test_split_discovery_and_errors(tmp_path):
    write_split(tmp_path / "train.jsonl.gz", ROWS)
    write_split(tmp_path / "validation.csv", ROWS)
    assert set(find_split_files(tmp_path)) == {"train", "dev"}
    splits, origins = load_splits(tmp_path)
    assert len(splits["dev"]) == 3 and origins["dev"].endswith("validation.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no split files"):
        load_splits(empty)
    with pytest.raises(DataError, match="does not exist"):
        load_splits(tmp_path / "missing" / "folder")
    with pytest.raises(DataError, match="is a file"):
        load_splits(tmp_path / "train.jsonl.gz")


def test_hub_name_without_datasets_gives_local_hint(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match="local folder holding train.jsonl"):
        load_splits("glue:sst2")


def test_seeded_subset():
    rows = [{"i": i} for i in range(1000)]
    a, idx_a = subset(rows, 100, seed=3)
    b, idx_b = subset(rows, 100, seed=3)
    c, idx_c = subset(rows, 100, seed=4)
    assert idx_a == idx_b and idx_a != idx_c and idx_a == sorted(idx_a) and len(set(idx_a)) == 100
    assert [r["i"] for r in a] == idx_a
    assert subset(rows, None, 0) == (rows, None) and subset(rows, 5000, 0) == (rows, None)


def test_field_detection_messages():
    fields = Fields()
    assert detect_task([{"text": "a", "label": 0}], fields) == "classification"
    assert detect_task([{"prompt": "a", "completion": "b"}], fields) == "causal-lm"
    assert text_columns([{"text_a": "a", "text_b": "b", "label": 0}], fields, "train") == ["text_a", "text_b"]
    with pytest.raises(DataError, match="--text-field sentence"):
        text_columns([{"sentence": "a", "label": 0}], fields, "train")
    with pytest.raises(DataError, match="--label-field"):
        detect_task([{"sentence": "a", "y": 1}], fields)
    assert not is_labeled([{"text": "a", "label": -1}], "label") and is_labeled(ROWS, "label")


# ---- tokenisation and batching -----------------------------------------------------------------------------------
def test_encode_pairs_truncates_and_keeps_labels(tokenizer):
    rows = [{"text_a": "a premise " * 50, "text_b": "a hypothesis", "label": 1}, {"text_a": "x", "text_b": "y", "label": 0}]
    data = encode_classification(tokenizer, rows, Fields(), 2, max_length=16, split="train")
    assert data.length(0) == 16 and data.labels == [1, 0]
    assert set(data.features[1]["token_type_ids"]) == {0, 1}  # the pair is encoded as a pair


def test_causal_lm_masks_prompt_tokens(tokenizer):
    rows = [{"prompt": "question: two plus two", "completion": "four"}, {"text": "plain language modelling text"}]
    data = encode_causal_lm(tokenizer, rows, Fields(), max_length=32, split="train")
    prompt_len = len(tokenizer("question: two plus two")["input_ids"])
    assert data.labels[0][:prompt_len] == [-100] * prompt_len
    assert data.labels[0][prompt_len:] == data.features[0]["input_ids"][prompt_len:]
    assert data.labels[1] == data.features[1]["input_ids"]
    batch = collate(data, [0, 1], tokenizer.pad_token_id, "causal-lm")
    width = batch["input_ids"].shape[1]
    short = 0 if data.length(0) < data.length(1) else 1
    pad = width - data.length(short)
    assert pad > 0 and batch["labels"][short, -pad:].tolist() == [-100] * pad
    assert batch["attention_mask"][short].sum() == data.length(short)


def test_batches_are_seeded_complete_and_length_grouped(tokenizer):
    rows = sst2_rows("train", 2048)
    data = encode_classification(tokenizer, rows, Fields(), 2, max_length=64, split="train")
    first = train_batches(data, 32, seed=0, epoch=0)
    assert first == train_batches(data, 32, seed=0, epoch=0)
    assert first != train_batches(data, 32, seed=0, epoch=1) and first != train_batches(data, 32, seed=1, epoch=0)
    assert sorted(i for b in first for i in b) == list(range(len(rows)))

    def padded(batches):
        return sum(len(b) * max(data.length(i) for i in b) for b in batches)

    plain = train_batches(data, 32, seed=0, epoch=0, group_by_length=False)
    real = sum(data.length(i) for i in range(len(rows)))
    assert padded(first) < 1.1 * real < padded(plain)  # grouping removes nearly all padding
    batches = eval_batches(data, 100)
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))
    batch = collate(data, first[0], tokenizer.pad_token_id, "classification")
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape
    assert batch["labels"].tolist() == [rows[i]["label"] for i in first[0]]


# ---- metrics -----------------------------------------------------------------------------------------------------
def test_binary_metrics_match_hand_computation():
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 1]
    preds = [1, 1, 0, 1, 0, 1, 0, 0, 1, 1]
    tp, tn, fp, fn = 4, 3, 2, 1
    metrics = classification_metrics(preds, labels, 2)
    assert metrics["accuracy"] == pytest.approx(0.7, abs=1e-12)
    assert metrics["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert metrics["mcc"] == pytest.approx(expected, abs=1e-12)
    assert matthews([1] * 10, labels, 2) == 0.0  # constant predictions


def test_multiclass_metrics_match_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    labels = [rng.randrange(3) for _ in range(200)]
    preds = [t if rng.random() < 0.6 else rng.randrange(3) for t in labels]
    assert matthews(preds, labels, 3) == pytest.approx(sklearn_metrics.matthews_corrcoef(labels, preds), abs=1e-12)
    assert f1_score(preds, labels, 3) == pytest.approx(sklearn_metrics.f1_score(labels, preds, average="macro"), abs=1e-12)
