"""Supervised fine-tuning rows as users hold them -> token ids with completion-only labels.

Three row shapes (besides plain ``text`` rows, where every token is a target):

- prompt/completion (``--prompt-field``/``--completion-field``): plain text ``prompt + completion + eos``, or with
  ``--chat-template`` a user turn and an assistant turn rendered by the tokenizer's chat template;
- OpenAI-style ``messages`` (a list of ``{"role", "content"}``), always rendered with the chat template;
- Alpaca (``instruction``, optional ``input``, ``output``): the Alpaca prompt in plain text, or a user turn
  (instruction, a blank line, input) with ``--chat-template``.

Only completion / assistant tokens are targets (label = token id); everything else is ``IGNORE`` (-100). A rendered
conversation is tokenised piece by piece (text before each assistant reply, the reply, ...), so the boundaries are
exact token boundaries. Truncation to ``max_length`` may shorten a completion ("cut") or remove it entirely
("empty"); the caller reports both, and drops empty rows rather than train them as prompt-only rows.
"""

from __future__ import annotations

from typing import Any

from .data import DataError, Fields

IGNORE = -100
ALPACA_FIELDS = ("instruction", "output")
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
MESSAGES = "messages"


def row_shape(row: dict[str, Any], fields: Fields) -> str | None:
    """"messages", "prompt", "alpaca", "text", or None when the row has none of these shapes."""
    if isinstance(row.get(MESSAGES), list):
        return "messages"
    if fields.prompt in row:
        return "prompt"
    if all(isinstance(row.get(f), str) for f in ALPACA_FIELDS):
        return "alpaca"
    if isinstance(row.get(fields.text), str):
        return "text"
    return None


def _alpaca_user(row: dict[str, Any]) -> str:
    extra = row.get("input") or ""
    return row["instruction"] + (f"\n\n{extra}" if extra else "")


def to_messages(row: dict[str, Any], fields: Fields, shape: str, where: str) -> list[dict[str, str]]:
    """The conversation a row stands for (a prompt/completion or Alpaca row is one user and one assistant turn)."""
    if shape == "prompt":
        prompt, completion = _prompt_completion(row, fields, where)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if shape == "alpaca":
        return [{"role": "user", "content": _alpaca_user(row)}, {"role": "assistant", "content": row["output"]}]
    messages = row[MESSAGES]
    for number, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            raise DataError(f"{where}: message {number} must be an object with string 'role' and 'content' fields")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _prompt_completion(row: dict[str, Any], fields: Fields, where: str) -> tuple[str, str]:
    prompt, completion = row.get(fields.prompt), row.get(fields.completion)
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DataError(f"{where} needs text in '{fields.prompt}' and '{fields.completion}' (--prompt-field/"
                        f"--completion-field)")
    return prompt, completion


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _extend(text: str, done: str, where: str) -> str:
    if not text.startswith(done):
        raise DataError(f"{where}: the chat template does not render this conversation turn by turn (an earlier "
                        f"turn's text changes when a later one is added); pass prompt/completion rows without "
                        f"--chat-template")
    return text[len(done):]


def chat_segments(tokenizer: Any, messages: list[dict[str, str]], where: str) -> list[tuple[str, bool]]:
    """(text, is_target) pieces of the rendered conversation: each assistant reply (with its end-of-turn marker) is
    a target; the text between replies, including each ``<assistant>`` header, is not."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: rendering a conversation needs a tokenizer with a chat template; this model has "
                        f"none (use prompt/completion rows without --chat-template)")
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            head = _render(tokenizer, messages[:i], True) if i else ""
            segments.append((_extend(head, done, where), False))
            done = head
        full = _render(tokenizer, messages[: i + 1], False)
        segments.append((_extend(full, done, where), message["role"] == "assistant"))
        done = full
    return [(text, target) for text, target in segments if text]


def plain_segments(row: dict[str, Any], fields: Fields, shape: str, where: str) -> list[tuple[str, bool]]:
    """(prompt, False), (completion, True) of a prompt/completion or Alpaca row in plain text."""
    if shape == "alpaca":
        extra = row.get("input") or ""
        prompt = ALPACA_PROMPT.format(with_input=", paired with an input that provides further context" if extra else "",
                                      instruction=row["instruction"],
                                      input_block=f"### Input:\n{extra}\n\n" if extra else "")
        return [(prompt, False), (row["output"], True)]
    return list(zip(_prompt_completion(row, fields, where), (False, True)))


def encode_sft_row(
    tokenizer: Any, row: dict[str, Any], fields: Fields, shape: str, chat: bool, max_length: int, where: str
) -> tuple[list[int], list[int], str]:
    """(input ids, labels, status) of one prompt/completion, messages or Alpaca row; status is "ok", "cut" (the
    completion lost tokens to ``max_length``) or "empty" (no completion token is left)."""
    ids: list[int] = []
    labels: list[int] = []
    if chat or shape == "messages":
        for text, target in chat_segments(tokenizer, to_messages(row, fields, shape, where), where):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if target else [IGNORE] * len(piece)
    else:
        (prompt, _), (completion, _) = plain_segments(row, fields, shape, where)
        head = tokenizer(prompt)["input_ids"]  # with the tokenizer's own special tokens (e.g. BOS), as for plain text
        tail = tokenizer(completion, add_special_tokens=False)["input_ids"]
        tail = tail + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        ids, labels = head + tail, [IGNORE] * len(head) + tail
    targets = sum(label != IGNORE for label in labels)
    kept = sum(label != IGNORE for label in labels[:max_length])
    status = "empty" if kept == 0 else "cut" if kept < targets else "ok"
    return ids[:max_length], labels[:max_length], status


def generation_prompt(
    tokenizer: Any, row: dict[str, Any], fields: Fields, chat: bool, where: str
) -> tuple[list[int], str]:
    """(prompt token ids, reference text) for generating a row's completion: everything before the last assistant
    reply (with the assistant header when chatting), and that reply / the completion / the output."""
    shape = row_shape(row, fields)
    if shape not in ("prompt", "messages", "alpaca"):
        raise DataError(f"{where} has fields {sorted(row)}; generation needs '{fields.prompt}'/'{fields.completion}', "
                        f"'messages' or Alpaca ('instruction', 'output') rows")
    if chat or shape == "messages":
        messages = to_messages(row, fields, shape, where)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DataError(f"{where}: the conversation has no assistant reply to compare with")
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: --chat-template / messages rows need a tokenizer with a chat template")
        text = _render(tokenizer, messages[:last], True)
        return tokenizer(text, add_special_tokens=False)["input_ids"], messages[last]["content"]
    (prompt, _), (completion, _) = plain_segments(row, fields, shape, where)
    return tokenizer(prompt)["input_ids"], completion
