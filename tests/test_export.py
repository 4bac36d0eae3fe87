"""Merged export: ``model.merge_and_unload().save_pretrained(dir)`` and ``deltatune merge`` write plain transformers
folders that ``AutoModel*.from_pretrained`` loads in a fresh Python process that never imports deltatune (no
missing or unexpected keys), and whose outputs equal the adapter model's to <= 1e-5."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.cli import main

pytest.importorskip("transformers")

LOADER = r'''
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

classes = {"causal": AutoModelForCausalLM, "cls": AutoModelForSequenceClassification}
results = {}
for job in json.load(open(sys.argv[1])):
    model, info = classes[job["auto"]].from_pretrained(job["dir"], output_loading_info=True)
    inputs = torch.load(job["inputs"], weights_only=True)
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    results[job["name"]] = {"logits": logits, "type": type(model).__name__,
                            "bad_keys": sorted(info["missing_keys"]) + sorted(info["unexpected_keys"])}
results["__deltatune_imported__"] = any(m.split(".")[0] == "deltatune" for m in sys.modules)
torch.save(results, sys.argv[2])
'''


def bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, num_labels=3))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))


def llama(vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=False))


# name -> (base builder, config, Auto class); every adapter gets random nonzero B / magnitude / head copy
CASES = {
    "bert_lora_head": (bert_cls, lambda: dt.LoraConfig(r=4, targets=["query", "value"], modules_to_save=["classifier"]), "cls"),
    "bert_dora": (bert_cls, lambda: dt.DoraConfig(r=4, targets=["query", "key", "dense"]), "cls"),
    "gpt2_lora_conv1d": (gpt2, lambda: dt.LoraConfig(r=4, targets=["c_attn", "c_fc"]), "causal"),
    "llama_lora_all_linear_embed": (llama, lambda: dt.LoraConfig(r=4, targets=["q_proj", "v_proj", "down_proj", "embed_tokens"]), "causal"),
    "llama_mora": (llama, lambda: dt.MoraConfig(r=4, targets=["q_proj", "o_proj"]), "causal"),
}


def randomize(model: dt.DeltaModel) -> None:
    """Make every adapter tensor nonzero and far from its init, so the merged delta is visible in the outputs."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))


def inputs_for() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 64, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, minilm_path) -> dict:
    """Every case merged and saved, plus one ``deltatune merge`` of a saved Llama adapter; then one fresh process
    loads all folders with transformers alone."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("export")
    jobs, expected = [], {}
    for name, (build, config, auto) in CASES.items():
        model = dt.wrap(build(), config())
        randomize(model)
        model.eval()
        inputs = inputs_for()
        with torch.no_grad():
            expected[name] = model(**inputs).logits
        torch.save(inputs, root / f"{name}.pt")
        model.merge_and_unload().save_pretrained(root / name)
        jobs.append({"name": name, "dir": str(root / name), "auto": auto, "inputs": str(root / f"{name}.pt")})

    # deltatune merge: a base folder (with tokenizer) + an adapter folder -> a merged folder
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    base = llama(vocab=tokenizer.vocab_size)
    base.save_pretrained(root / "llama_base")
    tokenizer.save_pretrained(root / "llama_base")
    model = dt.wrap(base, dt.LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize(model)
    model.save(root / "llama_adapter")
    inputs = inputs_for()
    with torch.no_grad():
        expected["cli_merge"] = model.eval()(**inputs).logits
    torch.save(inputs, root / "cli_merge.pt")
    assert main(["merge", "--model", str(root / "llama_base"), "--adapter", str(root / "llama_adapter"),
                 "--out", str(root / "cli_merge"), "--task", "causal-lm"]) == 0
    jobs.append({"name": "cli_merge", "dir": str(root / "cli_merge"), "auto": "causal", "inputs": str(root / "cli_merge.pt")})

    (root / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    (root / "loader.py").write_text(LOADER, encoding="utf-8")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(root / "loader.py"), str(root / "jobs.json"), str(root / "out.pt")],
                            capture_output=True, text=True, timeout=180, env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-4000:]
    return {"root": root, "expected": expected, "loaded": torch.load(root / "out.pt", weights_only=False)}


def test_loader_process_never_imported_deltatune(exported):
    assert exported["loaded"]["__deltatune_imported__"] is False


@pytest.mark.parametrize("name", [*CASES, "cli_merge"])
def test_merged_folder_loads_with_transformers_and_matches(exported, name):
    loaded = exported["loaded"][name]
    assert loaded["bad_keys"] == []
    assert loaded["type"] in ("BertForSequenceClassification", "GPT2LMHeadModel", "LlamaForCausalLM")
    files = {p.name for p in Path(exported["root"], name).iterdir()}
    assert "config.json" in files and "model.safetensors" in files and "adapter_config.json" not in files
    torch.testing.assert_close(loaded["logits"], exported["expected"][name], rtol=0, atol=1e-5)


def test_merge_changes_outputs(exported):
    """The adapters are not no-ops: the merged models differ from their bases (else the equality proves nothing)."""
    for name, (build, _, _) in CASES.items():
        with torch.no_grad():
            base_logits = build().eval()(**inputs_for()).logits
        assert float((base_logits - exported["expected"][name]).abs().max()) > 1e-2, name


def test_cli_merge_writes_tokenizer(exported):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported["root"] / "cli_merge")
    assert tokenizer("good movie")["input_ids"][0] == tokenizer.cls_token_id
