"""Classification data as a generation task: each label becomes a word (``--label-words negative,positive``).

With ``--task causal-lm --label-words W0,W1,...`` a labeled row (``text``, or ``text_a``/``text_b``) becomes a
prompt/completion row: the prompt is the text followed by an instruction naming the words
(``"<text>\\nAnswer with one word: negative or positive.\\nAnswer:"``), the completion is the row's label word
(``" positive"``). Word ``i`` stands for label id ``i`` (integer labels) or for the ``i``-th label name in sorted
order (string labels). The rows then train and evaluate like any prompt/completion rows (completion-only loss,
``--chat-template`` renders them as a user and an assistant turn), and ``--generate`` scores the first label word in
the generated text (``first_choice``) against the row's word.
"""

from __future__ import annotations

import re
from typing import Any

from .data import DataError, Fields, label_ids, text_columns


def check_words(words: list[str] | None, space: list[str] | int) -> list[str] | None:
    """The label words, one per class, distinct, non-empty; None when not given."""
    if words is None:
        return None
    classes = space if isinstance(space, int) else len(space)
    cleaned = [w.strip() for w in words]
    if len(cleaned) != classes:
        names = f"labels 0..{classes - 1}" if isinstance(space, int) else f"labels {', '.join(space)} (sorted)"
        raise DataError(f"--label-words has {len(cleaned)} words but the data has {classes} classes; give one word per "
                        f"class, in the order of its {names}")
    if not all(cleaned) or len({w.lower() for w in cleaned}) != len(cleaned):
        raise DataError(f"--label-words {','.join(words)}: the words must be non-empty and distinct")
    return cleaned


def instruction(words: list[str]) -> str:
    listed = ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]
    return f"Answer with one word: {listed}."


def verbalize(rows: list[dict[str, Any]], fields: Fields, space: list[str] | int, words: list[str],
              split: str) -> list[dict[str, Any]]:
    """Labeled rows -> prompt/completion rows (under ``fields.prompt`` / ``fields.completion``) whose completion is
    the label word."""
    if not rows:
        raise DataError(f"the {split} split is empty")
    columns = text_columns(rows, fields, split)
    ids = label_ids(rows, fields.label, space, split)
    ask = instruction(words)
    out = []
    for number, (row, label) in enumerate(zip(rows, ids)):
        texts = [row.get(c) for c in columns]
        if not all(isinstance(t, str) for t in texts):
            raise DataError(f"{split} row {number} has no text in {', '.join(columns)}")
        out.append({fields.prompt: "\n".join(texts) + f"\n{ask}\nAnswer:", fields.completion: f" {words[label]}"})
    return out


def first_choice(text: str, words: list[str]) -> str | None:
    """The first of ``words`` (whole word, any case) in ``text``, as spelled in ``words``; None when none occurs."""
    pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")(?!\w)",
                         re.IGNORECASE)
    found = pattern.search(text)
    if found is None:
        return None
    return next(w for w in words if w.lower() == found.group(1).lower())
