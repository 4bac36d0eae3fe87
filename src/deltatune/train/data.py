"""Datasets for training: local split files (jsonl, jsonl.gz, csv, tsv, parquet) or a Hugging Face dataset name,
seeded subsets, field mapping, and conversion to plain rows ``{"text" | "text_a","text_b" | "prompt","completion",
"label"}``. Tokenisation and batching live in ``deltatune.train.batching``."""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import DeltatuneError

SPLIT_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "dev": ("dev", "validation", "valid", "val"),
    "test": ("test",),
}
EXTENSIONS = (".jsonl.gz", ".jsonl", ".json", ".csv.gz", ".csv", ".tsv.gz", ".tsv", ".parquet")


class DataError(DeltatuneError, ValueError):
    """Training/eval data is missing, unreadable, or does not have the expected fields."""


@dataclass
class Fields:
    """Names of the columns to read (``text`` or ``text_a``/``text_b`` + ``label``; ``prompt``/``completion``)."""

    text: str = "text"
    text_a: str = "text_a"
    text_b: str = "text_b"
    label: str = "label"
    prompt: str = "prompt"
    completion: str = "completion"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# ---- reading files -----------------------------------------------------------------------------------------------
def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")  # type: ignore[return-value]
    return open(path, encoding="utf-8", newline="")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with _open_text(path) as f:
        text = f.read()
    if path.name.endswith(".json") and text.lstrip().startswith("["):
        data = json.loads(text)
        if not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path} must hold a JSON list of objects")
        return data
    # split on "\n" only: str.splitlines() also breaks at U+2028, U+0085 and friends, which JSON strings may hold
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number} is not valid JSON ({error.msg}); expected one object per line") from error
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number} is not a JSON object")
        rows.append(row)
    return rows


def _read_delimited(path: Path, delimiter: str) -> list[dict[str, Any]]:
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE)
        return [dict(row) for row in reader]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        try:
            import pandas as pd
        except ImportError:
            raise DataError(
                f"reading {path.name} needs pyarrow (or pandas with a parquet engine): pip install pyarrow, "
                f"or convert the file to jsonl/csv"
            ) from None
        try:
            return pd.read_parquet(path).to_dict("records")
        except ImportError as error:
            raise DataError(f"reading {path.name} needs a parquet engine: pip install pyarrow ({error})") from error
    return pq.read_table(path).to_pylist()


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """All rows of one split file as dictionaries (format chosen by the file name's extension)."""
    path = Path(path)
    name = path.name
    try:
        if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
            return _read_jsonl(path)
        if name.endswith((".csv", ".csv.gz")):
            return _read_delimited(path, ",")
        if name.endswith((".tsv", ".tsv.gz")):
            return _read_delimited(path, "\t")
        if name.endswith(".parquet"):
            return _read_parquet(path)
    except (OSError, UnicodeDecodeError, EOFError, csv.Error) as error:
        raise DataError(f"could not read {path}: {error}") from error
    raise DataError(f"{path}: unknown file type; use one of {', '.join(EXTENSIONS)}")


def find_split_files(folder: str | Path) -> dict[str, Path]:
    """``{"train": path, "dev": path, "test": path}`` for the split files present in ``folder``."""
    folder = Path(folder)
    found: dict[str, Path] = {}
    for split, stems in SPLIT_NAMES.items():
        for stem in stems:
            hits = [folder / f"{stem}{ext}" for ext in EXTENSIONS if (folder / f"{stem}{ext}").is_file()]
            if hits:
                found[split] = hits[0]
                break
    return found


# ---- loading a dataset -------------------------------------------------------------------------------------------
def _load_hub(name: str) -> dict[str, list[dict[str, Any]]]:
    """A Hugging Face dataset (``name`` or ``name:config``) as ``{split: rows}``; needs ``datasets`` and network."""
    hint = "or point --data at a local folder holding train.jsonl(.gz) plus dev.* and/or test.* (csv, tsv, parquet also work)"
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"--data {name!r} is not a local folder, and loading it from the Hugging Face Hub needs the "
            f"'datasets' package (pip install datasets); {hint}"
        ) from None
    repo, _, config = name.partition(":")
    try:
        loaded = datasets.load_dataset(repo, config or None)
    except Exception as error:  # network errors, unknown names: many exception types
        raise DataError(f"could not load Hugging Face dataset {name!r} ({type(error).__name__}: {error}); {hint}") from error
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, stems in SPLIT_NAMES.items():
        for stem in stems:
            if stem in loaded:
                splits[split] = loaded[stem].to_list()
                break
    return splits


def load_splits(source: str | Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """Read every split of ``source`` (a folder or a hub dataset name); returns (rows per split, origin per split)."""
    path = Path(source)
    if path.is_dir():
        files = find_split_files(path)
        if "train" not in files and not any(s in files for s in ("dev", "test")):
            raise DataError(
                f"no split files in {path}: expected train.<ext> plus dev.<ext>/validation.<ext> and/or test.<ext> "
                f"(<ext>: {', '.join(EXTENSIONS)})"
            )
        return {split: read_rows(file) for split, file in files.items()}, {s: str(f) for s, f in files.items()}
    if path.exists():
        raise DataError(f"--data {source} is a file; pass the folder that holds the train/dev/test files")
    if path.is_absolute() or str(source).startswith((".", "~")) or str(source).count("/") > 1:
        raise DataError(f"data folder {source} does not exist")
    splits = _load_hub(str(source))
    return splits, {s: f"hf:{source}/{s}" for s in splits}


def subset(rows: list[dict[str, Any]], limit: int | None, seed: int) -> tuple[list[dict[str, Any]], list[int] | None]:
    """A seeded random subset of ``limit`` rows (kept in their original order) and its row indices."""
    if limit is None or limit >= len(rows):
        return rows, None
    if limit <= 0:
        raise DataError(f"subset size must be positive, got {limit}")
    indices = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in indices], indices


# ---- fields and tasks --------------------------------------------------------------------------------------------
def _string_fields(row: dict[str, Any]) -> list[str]:
    return [k for k, v in row.items() if isinstance(v, str)]


def detect_task(rows: list[dict[str, Any]], fields: Fields) -> str:
    """"classification" when rows carry the label field, else "causal-lm" (prompt/completion or text)."""
    if not rows:
        raise DataError("the training split is empty")
    first = rows[0]
    if fields.label in first:
        return "classification"
    if fields.label != Fields.label:  # the user named a label column that is not there
        raise DataError(f"rows have fields {sorted(first)}; there is no label field '{fields.label}' (--label-field)")
    if fields.prompt in first or fields.text in first or isinstance(first.get("messages"), list) or (
            "instruction" in first and "output" in first):
        return "causal-lm"
    raise DataError(
        f"rows have fields {sorted(first)}; expected '{fields.label}' (classification) or '{fields.prompt}'/"
        f"'{fields.completion}', 'messages', 'instruction'/'output' or '{fields.text}' (causal LM). Name the columns with --label-field/--text-field/"
        f"--prompt-field/--completion-field"
    )


def text_columns(rows: list[dict[str, Any]], fields: Fields, split: str) -> list[str]:
    """The text column(s) used for classification: ``[text]`` or ``[text_a, text_b]``."""
    first = rows[0]
    if fields.text in first:
        return [fields.text]
    if fields.text_a in first:
        return [fields.text_a, fields.text_b] if fields.text_b in first else [fields.text_a]
    candidates = [k for k in _string_fields(first) if k != fields.label]
    hint = f"; pass --text-field {candidates[0]}" if candidates else ""
    raise DataError(
        f"{split} rows have fields {sorted(first)}; none is '{fields.text}' or '{fields.text_a}'/'{fields.text_b}'{hint}"
    )


def _as_label(value: Any) -> int | str:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.lstrip("-").isdigit():
            return int(stripped)
        return stripped
    raise DataError(f"label {value!r} is neither an integer nor a string")


MAX_CLASSES = 10_000  # a classifier head over more classes than this is a data error (a stray id or a typo)


def label_space(train_rows: list[dict[str, Any]], field: str) -> list[str] | int:
    """Label names (sorted strings) when labels are strings, else the number of integer classes."""
    values = []
    for number, row in enumerate(train_rows):
        if field not in row:
            raise DataError(f"train row {number} has no '{field}' field (fields: {sorted(row)}); set --label-field")
        values.append(_as_label(row[field]))
    if all(isinstance(v, int) for v in values):
        if min(values) < 0:
            raise DataError(f"train labels must be >= 0 (found {min(values)}); unlabeled rows cannot be trained on")
        if max(values) >= MAX_CLASSES:
            row = values.index(max(values))
            raise DataError(
                f"train row {row} has label {max(values)}, which would make {max(values) + 1:,} classes (limit "
                f"{MAX_CLASSES:,}); fix that row, or number the classes 0..K-1"
            )
        return max(values) + 1
    names = sorted({str(v) for v in values})
    if len(names) > MAX_CLASSES:
        raise DataError(
            f"the train labels have {len(names):,} distinct values (limit {MAX_CLASSES:,} classes); is --label-field "
            f"'{field}' a free-text or id column? Point it at the class column"
        )
    return names


def label_ids(rows: list[dict[str, Any]], field: str, space: list[str] | int, split: str) -> list[int]:
    """Integer class ids for ``rows`` (string labels mapped through ``space``)."""
    out: list[int] = []
    for number, row in enumerate(rows):
        if field not in row:
            raise DataError(f"{split} row {number} has no '{field}' field (fields: {sorted(row)}); set --label-field")
        value = _as_label(row[field])
        if isinstance(space, int):
            if not isinstance(value, int) or not 0 <= value < space:
                raise DataError(f"{split} row {number} has label {value!r}; the training labels are 0..{space - 1}")
            out.append(value)
        else:
            if str(value) not in space:
                raise DataError(f"{split} row {number} has label {value!r}, not among the training labels {space}")
            out.append(space.index(str(value)))
    return out


def is_labeled(rows: list[dict[str, Any]], field: str) -> bool:
    """False for splits released without labels (every label missing or negative, like GLUE test sets)."""
    values = [row.get(field) for row in rows]
    return any(v is not None and not (isinstance(v, (int, float)) and v < 0) for v in values)
