"""The causal-LM fast path end to end: the trainer's first steps on the default (fused loss, checkpointed blocks,
length-grouped batches) equal the plain path's, the held-out loss from the fused head equals the full-logits loss,
each lever has a CLI flag to turn it off, and SmolLM2 takes the fast path by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.cli import build_parser, settings_from_args
from deltatune.train.batching import Encoded
from deltatune.train.lm_fast import checkpointing_wanted, loss_function
from deltatune.train.run import run_training
from deltatune.train.settings import RunSettings
from deltatune.train.tasks import evaluate

transformers = pytest.importorskip("transformers")


def llama_folder(out: Path, tokenizer_path: str) -> str:
    """A tiny random Llama (tied embeddings) with MiniLM's tokenizer, saved as a model folder."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def lm_data(out: Path) -> str:
    out.mkdir()
    rows = [{"prompt": f"count from {i} by {1 + i % 3}:", "completion": " ".join(str(i + j * (1 + i % 3))
                                                                                for j in range(2 + i % 5))}
            for i in range(48)]
    for split, part in (("train", rows), ("dev", rows[:12])):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return str(out)


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trainer_steps_on_the_fast_path_equal_the_plain_path(tmp_path, minilm_path):
    model, data = llama_folder(tmp_path / "llama", minilm_path), lm_data(tmp_path / "data")
    common = dict(data=data, model=model, method="lora", method_options={"r": "4", "dropout": "0.1",
                                                                       "targets": "all-linear"},
                  max_steps=6, batch_size=8, lr=5e-3, eval_every=3, quiet=True, seed=3)
    fast = run_training(RunSettings(**common, out=str(tmp_path / "fast")))
    plain = run_training(RunSettings(**common, fused_ce=False, gradient_checkpointing=False, out=str(tmp_path / "plain")))
    assert fast["checkpointed_blocks"] == 3 and "checkpointed_blocks" not in plain
    fast_rows, plain_rows = _history(tmp_path / "fast"), _history(tmp_path / "plain")
    assert [r["type"] for r in fast_rows] == [r["type"] for r in plain_rows] and len(fast_rows) >= 8
    for a, b in zip(fast_rows, plain_rows):  # train losses, grad norms and the dev losses (fused eval vs full logits)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)
        if "grad_norm" in a:
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
    from safetensors.torch import load_file

    tuned = [load_file(str(tmp_path / run / "adapter_model.safetensors")) for run in ("fast", "plain")]
    assert tuned[0].keys() == tuned[1].keys()
    for name in tuned[0]:
        torch.testing.assert_close(tuned[0][name], tuned[1][name], atol=1e-5, rtol=1e-4, msg=name)


def _tiny_lm():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_held_out_loss_from_the_fused_head_equals_the_full_logits_loss(method: str) -> None:
    config = dt.LoraConfig(r=4, targets="all-linear") if method == "lora" else dt.PromptTuningConfig(num_virtual_tokens=3)
    model = dt.wrap(_tiny_lm(), config)
    g = torch.Generator().manual_seed(1)
    features, labels = [], []
    for length in (5, 9, 14, 20, 3):
        ids = torch.randint(0, 96, (length,), generator=g).tolist()
        features.append({"input_ids": ids})
        labels.append([-100] * (length // 2) + ids[length // 2:])
    data = Encoded(features, labels)
    fused = evaluate(model, data, "causal-lm", pad_id=0, batch_size=2, fused=True)
    plain = evaluate(model, data, "causal-lm", pad_id=0, batch_size=2, fused=False)
    assert fused["tokens"] == plain["tokens"] == sum(len(y) - len(y) // 2 - (len(y) // 2 == 0) for y in labels)
    assert fused["loss"] == pytest.approx(plain["loss"], rel=1e-6)


def test_each_lever_has_a_flag_to_turn_it_off() -> None:
    parser = build_parser()
    base = ["train", "--model", "smollm2", "--data", "x", "--method", "lora"]
    default = settings_from_args(parser.parse_args(base), "lora")
    assert default.fused_ce and default.group_by_length and default.gradient_checkpointing is None
    assert checkpointing_wanted(default.gradient_checkpointing, "causal-lm")
    assert not checkpointing_wanted(default.gradient_checkpointing, "classification")
    off = settings_from_args(parser.parse_args(
        [*base, "--no-fused-ce", "--no-gradient-checkpointing", "--no-group-by-length"]), "lora")
    assert not off.fused_ce and not off.group_by_length and off.gradient_checkpointing is False
    assert not checkpointing_wanted(off.gradient_checkpointing, "causal-lm")
    forced = settings_from_args(parser.parse_args([*base, "--gradient-checkpointing"]), "lora")
    assert checkpointing_wanted(forced.gradient_checkpointing, "classification")


def test_smollm2_takes_the_fast_path_by_default(smollm2) -> None:
    from deltatune.train.models import load_model, prepare_method, unwrap_hf
    from deltatune.train.options import build_configs

    model, _ = load_model(smollm2.path, "causal-lm")
    model = prepare_method(model, "lora", build_configs("lora", {"targets": "all-linear"}), [], "causal-lm")
    defaults = RunSettings(data="x", model=smollm2.path)
    assert loss_function(model, unwrap_hf(model), "causal-lm", defaults.fused_ce, False) is not None
    assert checkpointing_wanted(defaults.gradient_checkpointing, "causal-lm") and defaults.group_by_length
