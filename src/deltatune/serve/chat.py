"""OpenAI-compatible chat: ``POST /v1/chat/completions`` and ``GET /v1/models`` (request and response shapes).

A chat request is a completion whose prompt is the conversation rendered by the tokenizer's chat template with the
assistant header appended (``add_generation_prompt``); it then runs exactly like ``/v1/completions`` (same
micro-batches, mixed adapters, greedy or seeded top-p sampling, ``stop``, ``max_tokens``, streaming). ``model`` names
an adapter, or the base model by the server's base name (or ``"base"``, or omitted). A message's ``content`` is a
string or a list of ``{"type": "text", "text": ...}`` parts (joined).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..layers import BASE
from .registry import ServeError

DEFAULT_MAX_TOKENS = 256


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type", "text") == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the newer OpenAI name of max_tokens
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1

    def completion_fields(self, server_max: int) -> dict[str, Any]:
        """The ``CompletionRequest`` fields of this request (all but the prompt)."""
        if self.n != 1:
            raise ServeError(f"n must be 1 (one choice per request), got {self.n}")
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return {"model": self.model, "max_tokens": min(DEFAULT_MAX_TOKENS, server_max) if limit is None else limit,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "stop": self.stop,
                "stream": self.stream}


def adapter_of(model: str | None, base_name: str) -> str:
    """The adapter a request's ``model`` names (``BASE`` for the base model)."""
    return BASE if model in (None, "", "base", base_name, BASE) else model


def render(tokenizer: Any, messages: list[ChatMessage]) -> str:
    """The prompt text: the conversation in the chat template, ending with the assistant header."""
    if not messages:
        raise ServeError("messages is empty; send at least one {'role': 'user', 'content': ...}")
    if not getattr(tokenizer, "chat_template", None):
        raise ServeError("this model's tokenizer has no chat template; use /v1/completions with a plain prompt")
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # jinja TemplateError and friends: the template refused these messages
        raise ServeError(f"the chat template could not render these messages: {error}") from error


def chat_response(result: dict[str, Any], model: str | None) -> dict[str, Any]:
    """A ``chat.completion`` object from one engine completion result."""
    prompt, completion = result["prompt_tokens"], len(result["tokens"])
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                     "finish_reason": result["finish_reason"], "logprobs": None}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


def chat_chunk(ident: str, created: int, model: str | None, index: int, delta: str, finish: str | None) -> dict[str, Any]:
    """One ``chat.completion.chunk`` server-sent event: a text delta, or the last one with its finish reason."""
    body: dict[str, Any] = {"role": "assistant", "content": delta} if delta or finish is None else {}
    return {"id": ident.replace("cmpl-", "chatcmpl-", 1), "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [{"index": index, "delta": body, "finish_reason": finish, "logprobs": None}]}


def models_list(base_name: str, adapters: list[dict[str, Any]]) -> dict[str, Any]:
    """``GET /v1/models``: the base model, then every registered adapter."""
    rows = [{"id": base_name, "object": "model", "created": 0, "owned_by": "deltatune", "kind": "base"}]
    rows += [{"id": a["name"], "object": "model", "created": 0, "owned_by": "deltatune", "kind": "adapter",
              "loaded": a["loaded"], **({"method": a["method"]} if "method" in a else {})} for a in adapters]
    return {"object": "list", "data": rows}
