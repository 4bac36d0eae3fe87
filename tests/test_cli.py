"""The ``deltatune`` command end to end: train -> eval -> merge -> plain transformers, inspect, compare, and one-line
errors with exit code 2 for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import sst2_slice, tiny_bert_folder
from deltatune.cli import build_parser, main


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return sst2_slice(tmp_path_factory.mktemp("sst2"), {"train": 256, "dev": 64, "test": 64})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir, tiny_model) -> Path:
    """A LoRA run trained through the CLI (lr high enough that the adapter moves well away from zero)."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    code = main(["train", "--data", str(data_dir), "--model", tiny_model, "--method", "lora", "--r", "4", "--alpha", "8",
                 "--targets", "query,value", "--max-steps", "6", "--batch-size", "16", "--lr", "0.02", "--max-length", "64",
                 "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_train_writes_a_complete_run_folder(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "run.json", "training.png"} <= names
    run = json.loads((trained / "run.json").read_text())
    assert run["status"] == "done" and run["settings"]["method_options"] == {"r": "4", "alpha": "8", "targets": "query,value"}
    assert run["versions"]["torch"] == torch.__version__ and run["data"]["rows"] == {"train": 256, "dev": 64, "test": 64}
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["query", "value"] and config["modules_to_save"] == ["classifier"]
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == list(range(1, 7))
    assert (trained / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_merge_and_plain_transformers_agree(trained, data_dir, tmp_path, capsys):
    predictions = tmp_path / "preds.jsonl"
    assert main(["eval", "--adapter", str(trained), "--data", str(data_dir), "--json", "--predictions", str(predictions)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    run = json.loads((trained / "run.json").read_text())
    assert metrics["test"]["accuracy"] == pytest.approx(run["results"]["test"]["accuracy"], abs=1e-12)
    assert metrics["dev"]["accuracy"] == pytest.approx(run["results"]["dev"]["accuracy"], abs=1e-12)
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(trained), "--out", str(merged)]) == 0
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    rows = [json.loads(line) for line in (data_dir / "test.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in predictions.read_text().splitlines() if '"test"' in line]
    with torch.no_grad():
        batch = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
        logits = plain(**batch).logits
    ours = torch.tensor([e["logits"] for e in sorted(expected, key=lambda e: e["index"])])
    assert torch.allclose(logits, ours, atol=1e-5)
    assert logits.argmax(-1).tolist() == [e["prediction"] for e in sorted(expected, key=lambda e: e["index"])]
    assert logits.std() > 0  # the adapter and head really changed the outputs


def test_merge_needs_no_tokenizer(trained, tiny_model, tmp_path):
    """A base folder with weights only (no tokenizer files) merges to the same weights; the output has no tokenizer."""
    import shutil

    from safetensors.torch import load_file

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in Path(tiny_model).iterdir():
        if f.name in ("config.json", "model.safetensors"):
            shutil.copy(f, bare / f.name)
    assert main(["merge", "--adapter", str(trained), "--out", str(tmp_path / "with")]) == 0
    assert main(["merge", "--adapter", str(trained), "--model", str(bare), "--out", str(tmp_path / "without")]) == 0
    a = load_file(tmp_path / "with" / "model.safetensors")
    b = load_file(tmp_path / "without" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "without" / "tokenizer_config.json").exists()


def test_baseline_run_evals_and_merges(data_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "last"
    assert main(["train", "--data", str(data_dir), "--model", tiny_model, "--method", "last-layers", "--k", "1",
                 "--max-steps", "3", "--max-length", "64", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--data", str(data_dir), "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["accuracy"] == json.loads((out / "run.json").read_text())["results"]["test"]["accuracy"]
    assert main(["merge", "--adapter", str(out), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file()


def test_inspect_prints_config_tensors_and_counts(trained, capsys):
    assert main(["inspect", str(trained)]) == 0
    text = capsys.readouterr().out
    assert "method: lora" in text and '"r": 4' in text
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight  [4, 32]" in text
    # 2 layers x 2 targets x (A 4x32 + B 32x4) + classifier copy (2x32 + 2)
    assert f"parameters: {2 * 2 * 2 * 128 + 66:,}" in text


def test_method_options_come_from_every_registered_config():
    from deltatune.methods import METHODS
    from deltatune.train.options import method_fields

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = set(train._option_string_actions)
    for cls in METHODS.values():
        for name in method_fields(cls):
            assert f"--{name.replace('_', '-')}" in flags or name in {"k", "seed", "lr"}


def test_config_file_and_set(data_dir, tiny_model, tmp_path):
    config = tmp_path / "lora.yaml"
    config.write_text("method: lora\nr: 2\ntargets: [query]\n", encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data_dir), "--model", tiny_model, "--config", str(config), "--set", "alpha=4",
                 "--max-steps", "1", "--max-length", "32", "--out", str(out), "--quiet"]) == 0
    written = json.loads((out / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["target_modules"]) == (2, 4, ["query"])


BAD = [
    (["train", "--method", "lorra"], "did you mean lora"),
    (["train", "--method", "lora", "--bogus", "1"], "unrecognized arguments: --bogus"),
    (["train", "--method", "head", "--r", "4"], "does not apply to method 'head'"),
    (["train", "--method", "lora", "--r", "four"], "--r 'four' is not valid"),
    (["train", "--method", "lora", "--targets", "qury"], "closest: query"),
    (["train", "--text-field", "sentence"], "none is 'sentence'"),
    (["train", "--label-field", "y"], "no label field 'y'"),
    (["compare", "--methods", "lora,nope"], "unknown method 'nope'"),
    (["eval", "--split", "validation"], "has no validation split"),
]


@pytest.mark.parametrize(("argv", "message"), BAD)
def test_bad_inputs_exit_2_with_one_line(argv, message, data_dir, tiny_model, tmp_path, capsys):
    if argv[0] in ("train", "compare"):
        argv = [*argv, "--data", str(data_dir), "--model", tiny_model, "--out", str(tmp_path / "x"), "--max-steps", "1", "--quiet"]
    else:
        argv = [*argv, "--data", str(data_dir), "--model", tiny_model]
    with pytest.raises(SystemExit) if "unrecognized" in message else _no_exit() as caught:
        code = main(argv)
    code = getattr(caught, "value", None).code if "unrecognized" in message else code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_adapter_for_another_base_and_missing_data(trained, data_dir, tmp_path, minilm_path, capsys):
    other = tiny_bert_folder(tmp_path / "wide", minilm_path, hidden=48)
    assert main(["eval", "--adapter", str(trained), "--model", other, "--data", str(data_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit this model" in err and len(err.splitlines()) == 1
    assert main(["eval", "--adapter", str(trained), "--data", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), "--quiet"]) == 2


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and "deltatune" in capsys.readouterr().out
    assert main([]) == 0 and "compare" in capsys.readouterr().out


@pytest.mark.slow
def test_compare_writes_table_report_plots_and_reuses_runs(data_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--data", str(data_dir), "--model", tiny_model, "--methods", "full,head,last-layers,lora",
            "--r", "4", "--max-steps", "3", "--max-length", "64", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("method  "):]
    for method in ("full", "head", "last-layers", "lora"):
        assert any(line.startswith(method + " ") for line in table.splitlines())
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["results"]] == ["full", "head", "last-layers", "lora"]
    by = {r["method"]: r for r in results["results"]}
    assert by["full"]["trainable_pct"] == 100.0 and by["head"]["trainable_params"] == 66
    assert by["lora"]["adapter_bytes"] < by["last-layers"]["adapter_bytes"] < by["full"]["adapter_bytes"]
    assert all(r["peak_rss_bytes"] > 0 and r["s_per_step"] > 0 and r["test_metric"] is not None for r in by.values())
    assert (out / "metric_vs_params.png").is_file() and (out / "loss_curves.png").is_file()
    assert "| lora |" in (out / "report.md").read_text()
    assert main(argv) == 0  # finished runs are reused, not retrained
    assert all(r["status"] == "reused" for r in json.loads((out / "results.json").read_text())["results"])


def test_every_registered_method_trains_and_its_saved_adapter_reproduces_test_metrics(data_dir, tiny_model, tmp_path, capsys):
    from deltatune.methods import METHODS

    for method in METHODS:
        out = tmp_path / method
        common = ["--data", str(data_dir), "--max-eval", "32", "--max-length", "32"]
        assert main(["train", *common, "--model", tiny_model, "--method", method, "--max-steps", "2", "--out", str(out), "--quiet"]) == 0, method
        capsys.readouterr()
        assert main(["eval", *common, "--adapter", str(out), "--split", "test", "--json"]) == 0, method
        metrics = json.loads(capsys.readouterr().out)["test"]
        recorded = json.loads((out / "run.json").read_text())["results"]["test"]
        assert metrics["accuracy"] == recorded["accuracy"] and metrics["loss"] == pytest.approx(recorded["loss"], abs=1e-6), method


def test_qlora_train_and_eval_reproduce_metrics_on_an_nf4_base(data_dir, tiny_model, tmp_path, capsys):
    """--quantize nf4: the run trains over an NF4 base; eval re-quantizes the base and reproduces the metrics."""
    out = tmp_path / "qlora"
    assert main(["train", "--data", str(data_dir), "--model", tiny_model, "--method", "lora", "--r", "4",
                 "--targets", "query,value", "--max-steps", "3", "--batch-size", "16", "--lr", "0.02",
                 "--max-length", "64", "--quantize", "nf4", "--out", str(out), "--quiet"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["quantize"] == "nf4"
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--data", str(data_dir), "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["accuracy"] == pytest.approx(run["results"]["test"]["accuracy"], abs=1e-12)
    from deltatune.quant import NF4Linear
    from deltatune.train.inference import load_for_inference

    model, *_ = load_for_inference(None, out, None, None)
    assert any(isinstance(m.base_layer if hasattr(m, "base_layer") else m, NF4Linear) for m in model.modules())


def test_quantize_with_a_baseline_is_refused(data_dir, tiny_model, tmp_path, capsys):
    code = main(["train", "--data", str(data_dir), "--model", tiny_model, "--method", "full", "--quantize", "nf4",
                 "--max-steps", "1", "--out", str(tmp_path / "f"), "--quiet"])
    assert code == 2
    assert "--quantize nf4 keeps the base frozen in 4 bits; 'full' trains base weights" in capsys.readouterr().err
