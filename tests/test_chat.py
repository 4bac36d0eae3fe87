"""``deltatune generate`` and ``deltatune chat`` with SmolLM2: chat template, streamed text, conversation kept."""

from __future__ import annotations

import io

import pytest

from deltatune.chat import cmd_chat
from deltatune.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(io.StringIO):
    """Keeps every write, to see the reply arrive in pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_generate_answers_with_the_chat_template(smollm2, capsys):
    assert main(["generate", "--model", smollm2.path, "--max-new-tokens", "10", "What is the capital of France?"]) == 0
    assert capsys.readouterr().out == "The capital of France is Paris.\n"
    assert main(["generate", "--model", smollm2.path, "--plain", "--max-new-tokens", "3", "The capital of France is"]) == 0
    assert capsys.readouterr().out.startswith(" Paris")


def test_chat_streams_replies_and_keeps_the_conversation(smollm2, capsys):
    args = build_parser().parse_args(["chat", "--model", smollm2.path, "--max-new-tokens", "8"])
    out = Recorder()
    assert cmd_chat(args, out, io.StringIO("What is 2 + 3?\nAnd 10 + 10?\n\n")) == 0
    assert out.getvalue() == ("chat with the model: an empty line or Ctrl-D ends\nyou> model> 2 + 3 = 5\n"
                              "you> model> 10 + 10 = \nyou> ")
    first = out.writes[out.writes.index("model> ") + 1 : out.writes.index("\n", out.writes.index("model> "))]
    assert len(first) >= 2 and "".join(first) == "2 + 3 = 5"  # streamed in pieces, as decoded
    # the second reply follows from the first turn: asked alone, the question gets another answer
    assert main(["generate", "--model", smollm2.path, "--max-new-tokens", "8", "And 10 + 10?"]) == 0
    assert capsys.readouterr().out != "10 + 10 = \n"


def test_generate_refuses_a_classification_run(tmp_path, capsys):
    (tmp_path / "run.json").write_text('{"task": "classification", "settings": {"model": "minilm"}}')
    (tmp_path / "adapter_config.json").write_text("{}")
    code = main(["generate", "--adapter", str(tmp_path), "hi"])
    assert code == 2 and "generate/chat need a causal LM adapter" in capsys.readouterr().err
