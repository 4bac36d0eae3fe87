"""Per-row decoding control inside one batched ``generate()``: sampling, stop strings, token limits, streaming.

``generate()`` runs greedy (``do_sample=False``); rows that sample are decided by ``RowSampler``, a logits processor
that draws the row's token itself and leaves only that token finite, so greedy selection picks it:

    p = softmax(logits / T); keep the smallest set of most likely tokens whose mass reaches top_p (nucleus);
    token ~ p restricted to that set, renormalised, drawn with the row's own ``torch.Generator`` (seeded).

A row's draws depend only on its own logits and seed, never on the rest of the batch, so a seeded request gives
the same text whatever it is batched with (up to float rounding of its logits across batch layouts, which can move
a draw only when it lies within ~1e-9 of a token boundary, or a top-p cut-off that close to a token's probability). ``RowTracker`` (a stopping criterion, called after every step) keeps
each row's tokens and decoded text, stops the row at EOS, at its ``max_tokens`` or when a stop string appears (the
text is cut before it, as OpenAI does), and streams text deltas to the row's ``sink``. Streamed text holds back the
last word and any tail that may still become a stop string, so the deltas always add up to the final text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Sink = Callable[[str, "str | None"], None]  # (text delta, finish reason or None)


@dataclass
class Sampling:
    """One row's decoding settings: ``temperature`` 0 = greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def nucleus_sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token id drawn from ``softmax(logits / T)`` restricted to its top-p nucleus (see module doc).

    Computed in float64 and drawn in vocabulary order (inverse CDF), so logits that differ by float rounding (the
    same row computed in another batch) give the same token unless the draw lies that close to a boundary. Tokens
    exactly as likely as the least likely nucleus token are kept too.
    """
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        ordered = probs.sort(descending=True).values
        before = ordered.cumsum(-1) - ordered  # mass of the strictly more likely tokens
        cutoff = ordered[int((before < top_p).sum()) - 1]  # the most likely token always stays
        probs = probs.masked_fill(probs < cutoff, 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


class RowSampler:
    """A ``LogitsProcessor``: rows with ``temperature > 0`` get a sampled token (the only finite score)."""

    def __init__(self, settings: list[Sampling], device: torch.device) -> None:
        self.settings = settings
        self.generators: list[torch.Generator | None] = []
        for s in settings:
            if s.temperature > 0:
                seed = s.seed if s.seed is not None else int(torch.randint(0, 2**62, ()).item())
                self.generators.append(torch.Generator(device="cpu").manual_seed(seed))
            else:
                self.generators.append(None)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = len(self.settings)
        if scores.shape[0] != rows:
            raise ValueError(f"RowSampler has {rows} rows but generate() gave {scores.shape[0]}")
        out = scores.clone()
        for i, (s, generator) in enumerate(zip(self.settings, self.generators)):
            if generator is None:
                continue
            token = nucleus_sample(scores[i].detach().cpu(), s.temperature, s.top_p, generator)
            out[i].fill_(float("-inf"))
            out[i, token] = 0.0
        return out


@dataclass
class RowState:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: str = ""
    finish: str | None = None


class RowTracker:
    """A stopping criterion: per-row EOS / max_tokens / stop strings, decoded text and streamed deltas."""

    def __init__(self, tokenizer: Any, settings: list[Sampling], eos_ids: set[int], sinks: list[Sink | None]) -> None:
        self.tokenizer, self.settings, self.eos_ids, self.sinks = tokenizer, settings, eos_ids, sinks
        self.rows = [RowState() for _ in settings]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for i, (state, s) in enumerate(zip(self.rows, self.settings)):
            if state.finish is None:
                self._step(i, state, s, last[i])
        return torch.tensor([state.finish is not None for state in self.rows], device=input_ids.device)

    def _step(self, i: int, state: RowState, s: Sampling, token: int) -> None:
        if token in self.eos_ids:
            state.finish = "stop"
        else:
            state.tokens.append(token)
            state.text = self.tokenizer.decode(state.tokens, skip_special_tokens=True)
            hits = [k for k in (state.text.find(stop) for stop in s.stop) if k >= 0]
            if hits:
                state.text, state.finish = state.text[: min(hits)], "stop"
            elif len(state.tokens) >= s.max_tokens:
                state.finish = "length"
        self._stream(i, state, s)

    def _stream(self, i: int, state: RowState, s: Sampling) -> None:
        sink = self.sinks[i]
        if sink is None:
            return
        if state.finish is not None:
            sink(state.text[len(state.sent):] if state.text.startswith(state.sent) else "", state.finish)
            state.sent = state.text
            return
        hold = max((len(stop) - 1 for stop in s.stop), default=0)
        safe = state.text[: len(state.text) - hold] if hold else state.text
        safe = safe[: max(safe.rfind(" "), 0)]  # the last word may still change (detokenizer clean-up, merges)
        if len(safe) > len(state.sent) and safe.startswith(state.sent) and "\ufffd" not in safe[len(state.sent):]:
            sink(safe[len(state.sent):], None)
            state.sent = safe

    def finish_all(self) -> None:
        """Rows ``generate()`` stopped without our criterion saying so (its own length limit) end with "length"."""
        for i, (state, s) in enumerate(zip(self.rows, self.settings)):
            if state.finish is None:
                state.finish = "length"
                self._stream(i, state, s)

    def results(self) -> list[dict[str, Any]]:
        return [{"text": st.text, "tokens": st.tokens, "finish_reason": st.finish} for st in self.rows]
