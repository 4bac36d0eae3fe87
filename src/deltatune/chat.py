"""``deltatune generate`` and ``deltatune chat``: use a causal LM (a base, or a base with a trained adapter / run).

``generate`` answers one prompt; ``chat`` is an interactive terminal chat that keeps the conversation and renders
it with the model's chat template each turn. Both stream the text to the terminal as tokens come. A prompt is
rendered with the chat template (as a user turn, after ``--system`` if given) when the run was trained with one
(``--chat-template`` or ``messages`` rows), or, with no run settings, when the tokenizer has a template;
``--plain`` sends the prompt text as it is (``--chat-template`` forces the template). Decoding is greedy unless
``--temperature`` > 0 (then top-p sampling, seeded by ``--seed``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import IO, Any

from .errors import ConfigError


def add_eval_generation_options(ev: argparse.ArgumentParser) -> None:
    """``deltatune eval --generate`` options."""
    ev.add_argument("--generate", action="store_true", help="causal LM: also decode each prompt greedily and report "
                    "exact_match of the answers (--predictions FILE keeps prompt, reference, generated, correct)")
    ev.add_argument("--max-new-tokens", type=int, default=256, help="--generate: tokens per answer at most (256)")
    ev.add_argument("--answer-regex", metavar="REGEX", help="--generate: the answer is the last match (its first group "
                    "if any); default: the first number after the last '####', else the last number")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.add_argument("--threads", type=int, help="torch threads")


def add_chat_parsers(sub: Any) -> None:
    """The ``generate`` and ``chat`` subcommands."""
    for name, text in (("generate", "generate a reply to one prompt (streamed)"),
                       ("chat", "interactive terminal chat with the chat template (streamed; empty line or Ctrl-D ends)")):
        p = sub.add_parser(name, help=text, description=__doc__.split("\n\n")[1])
        if name == "generate":
            p.add_argument("prompt", help="the prompt text")
        p.add_argument("--model", help="base model (default: the one recorded in the run folder; 'smollm2' bundled)")
        p.add_argument("--adapter", help="adapter or run folder (none: the base model alone)")
        p.add_argument("--system", help="system message (chat template only)")
        form = p.add_mutually_exclusive_group()
        form.add_argument("--chat-template", action="store_true", help="render the prompt with the chat template")
        form.add_argument("--plain", action="store_true", help="send the prompt text as it is")
        p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply at most (256)")
        p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0)")
        p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
        p.add_argument("--threads", type=int, help="torch threads")
        p.add_argument("--debug", action="store_true", help="show tracebacks")


class Printer:
    """A transformers streamer that writes each finished piece of text to ``out`` as soon as it is decoded."""

    def __init__(self, tokenizer: Any, out: IO[str]) -> None:
        from transformers import TextStreamer

        printer = self

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                printer.write(text)

        self.streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out, self.pieces = out, []  # type: ignore[var-annotated]

    def write(self, text: str) -> None:
        if text:
            self.pieces.append(text)
            self.out.write(text)
            self.out.flush()


def load(args: argparse.Namespace) -> tuple[Any, Any, bool]:
    """(model, tokenizer, whether to use the chat template) for the command's options."""
    import torch

    from .train.inference import artifact_info, load_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    for flag, ok in (("--max-new-tokens", args.max_new_tokens >= 1), ("--temperature", 0 <= args.temperature <= 2),
                     ("--top-p", 0 < args.top_p <= 1)):
        if not ok:
            raise ConfigError(f"{flag} is out of range (max-new-tokens >= 1, temperature 0..2, top-p in (0, 1])")
    adapter = Path(args.adapter) if args.adapter else None
    info = artifact_info(adapter)
    if adapter is not None and info.get("task") not in (None, "causal-lm"):
        raise ConfigError(f"{adapter} was trained for {info['task']}; generate/chat need a causal LM adapter")
    model, tokenizer, _, _ = load_for_inference(args.model, adapter, "causal-lm", None)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if args.plain:
        chat = False
    elif args.chat_template:
        chat = True
    else:
        chat = bool(info["chat_template"]) if "chat_template" in info else has_template
    if chat and not has_template:
        raise ConfigError("this model's tokenizer has no chat template; pass --plain")
    return model, tokenizer, chat


def reply(model: Any, tokenizer: Any, ids: list[int], args: argparse.Namespace, out: IO[str]) -> str:
    """Generate after ``ids``, streaming to ``out``; returns the reply text (up to EOS)."""
    import torch

    from .train.generation import eos_ids

    printer = Printer(tokenizer, out)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else {
        "do_sample": False}
    torch.manual_seed(args.seed)
    stops = eos_ids(model, tokenizer)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=stops or None, streamer=printer.streamer, **sampling)
    tokens = generated[0, len(ids):].tolist()
    tokens = tokens[: next((k for k, t in enumerate(tokens) if t in stops), len(tokens))]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def encode(tokenizer: Any, messages: list[dict[str, str]], chat: bool) -> list[int]:
    if chat:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(messages[-1]["content"])["input_ids"]


def run_chat(args: argparse.Namespace) -> int:
    """Entry point of ``deltatune generate`` and ``deltatune chat``."""
    return cmd_generate(args) if args.command == "generate" else cmd_chat(args)


def cmd_generate(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    model, tokenizer, chat = load(args)
    system = [{"role": "system", "content": args.system}] if args.system and chat else []
    reply(model, tokenizer, encode(tokenizer, [*system, {"role": "user", "content": args.prompt}], chat), args, out)
    out.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace, out: IO[str] | None = None, stdin: IO[str] | None = None) -> int:
    out, stdin = out or sys.stdout, stdin or sys.stdin
    model, tokenizer, chat = load(args)
    messages = [{"role": "system", "content": args.system}] if args.system and chat else []
    out.write("chat with the model: an empty line or Ctrl-D ends\n")
    while True:
        out.write("you> ")
        out.flush()
        line = stdin.readline()
        if not line.strip():
            out.write("\n" if not line else "")
            return 0
        messages.append({"role": "user", "content": line.rstrip("\n")})
        out.write("model> ")
        text = reply(model, tokenizer, encode(tokenizer, messages, chat), args, out)
        out.write("\n")
        messages.append({"role": "assistant", "content": text})
