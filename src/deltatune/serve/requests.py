"""The request bodies of the HTTP app (``app.py``): pydantic models that refuse unknown fields with a 400."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .decoding import Sampling
from .registry import ServeError

# OpenAI completion fields the server accepts only at the value that means "not used", and why
UNSUPPORTED = {
    "n": (1, "one choice per prompt is returned; send the prompt several times in the prompt list instead"),
    "best_of": (None, "one choice per prompt is returned"),
    "echo": (False, "the prompt is not echoed back"),
    "logprobs": (None, "log-probabilities are not returned"),
    "suffix": (None, "insertion (text after the completion) is not supported"),
    "presence_penalty": (0, "repetition penalties are not implemented"),
    "frequency_penalty": (0, "repetition penalties are not implemented"),
    "logit_bias": (None, "logit biases are not implemented"),
}


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[str] = Field(..., description="one text or a list of texts")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field the server does not know is named in a 400, never ignored
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = 16
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    user: str | None = None  # OpenAI's end-user id: bookkeeping only
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    presence_penalty: float = 0
    frequency_penalty: float = 0
    logit_bias: dict[str, float] | None = None

    def check_supported(self) -> None:
        """Answer 400 naming the first OpenAI field set to something this server does not implement."""
        for name, (inert, why) in UNSUPPORTED.items():
            value = getattr(self, name)
            if value != inert and not (name == "logit_bias" and value == {}) and not (name == "best_of" and value == 1):
                raise ServeError(f"'{name}': {value!r} is not supported by this server ({why}); omit the field")

    def sampling(self, index: int) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        seed = None if self.seed is None else self.seed + index
        top_p = 1.0 if self.top_p is None else self.top_p
        return Sampling(self.max_tokens, self.temperature or 0.0, top_p, seed, tuple(stop))


class CombineRequest(BaseModel):
    """``DeltaModel.add_weighted_adapter`` of registered adapters (see ``deltatune.combine``)."""

    model_config = ConfigDict(extra="forbid")
    adapters: list[str]
    weights: list[float] | None = None  # default: 1 each
    type: str = "svd"
    density: float | None = None
    rank: int | None = None
    majority_sign_method: str = "total"
    seed: int = 0


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str | None = None
    combine: CombineRequest | None = None
