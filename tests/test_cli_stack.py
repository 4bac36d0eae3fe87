"""Stacked methods through the command line (``--method lora+prefix``): one adapter per part on one model, trained
together; each saved to its own PEFT-layout folder that loads alone with ``dt.load``; eval / merge / inspect / resume
/ compare on a stacked run; one-line errors (exit 2) for bad stacks and options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from conftest import sst2_slice
from deltatune.cli import build_parser, main, settings_from_args
from deltatune.train.models import load_model, load_tokenizer, prepare_method
from deltatune.train.options import build_configs
from deltatune.train.run import run_training
from deltatune.train.trainer import Interrupted

STACK = ["--method", "lora+prefix", "--r", "4", "--alpha", "8", "--set", "lora.targets=query,value",
         "--set", "prefix.num_virtual_tokens=4"]
BUDGET = ["--max-steps", "8", "--eval-every", "4", "--batch-size", "16", "--lr", "0.02", "--max-length", "48",
          "--dropout", "0.1", "--quiet"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return sst2_slice(tmp_path_factory.mktemp("sst2"), {"train": 64, "dev": 32, "test": 32})


def stack_settings(data_dir: Path, model: str, out: Path, extra: tuple[str, ...] = ()):
    """RunSettings parsed by the real ``deltatune train`` parser."""
    args = build_parser().parse_args(["train", "--data", str(data_dir), "--model", model, *STACK, *BUDGET,
                                      "--out", str(out), *extra])
    return settings_from_args(args, args.method)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir, tiny_model):
    """(run folder, the trained in-memory model after the best-dev restore)."""
    out = tmp_path_factory.mktemp("runs") / "stack"
    seen = {}
    run_training(stack_settings(data_dir, tiny_model, out), on_step=lambda trainer, row: seen.setdefault("m", trainer.model))
    return out, seen["m"].eval()


def fresh_base(model_path: str):
    model, _ = load_model(model_path, "classification", 2, None, seed=123)
    return model.eval()


def train_batch(data_dir: Path, model_path: str):
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(model_path)
    batch = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=48, return_tensors="pt")
    return batch, torch.tensor([int(r["label"]) for r in rows])


def test_stacked_run_trains_both_adapters_and_the_head_once(trained, data_dir, tiny_model):
    run_dir, model = trained
    assert {"lora", "prefix", "stack.json", "run.json", "metrics.jsonl"} <= {p.name for p in run_dir.iterdir()}
    assert not (run_dir / "adapter_config.json").exists()
    stack = json.loads((run_dir / "stack.json").read_text())
    assert stack["adapters"] == ["lora", "prefix"] and stack["method"] == "lora+prefix"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "done" and set(run["config"]) == {"lora", "prefix"}
    lora = json.loads((run_dir / "lora" / "adapter_config.json").read_text())
    prefix = json.loads((run_dir / "prefix" / "adapter_config.json").read_text())
    assert (lora["r"], lora["lora_alpha"], lora["target_modules"], lora["lora_dropout"]) == (4, 8, ["query", "value"], 0.1)
    assert lora["modules_to_save"] == ["classifier"] and not prefix["modules_to_save"]  # the head: once, in lora
    assert prefix["num_virtual_tokens"] == 4 and model.active_adapters == ["lora", "prefix"]

    # the same initial model the run started from (same seed, same construction order)
    initial, fresh = load_model(tiny_model, "classification", 2, None, seed=0)
    configs = build_configs("lora+prefix", run["settings"]["method_options"])
    initial = prepare_method(initial, "lora+prefix", configs, fresh, "classification").eval()
    before = dict(initial.named_parameters())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable.keys() == {n for n, p in before.items() if p.requires_grad}
    for part in ("lora", "prefix", "classifier"):
        names = [n for n in trainable if f".{part}." in n or n.startswith(f"model.{part}")]
        assert names, part
        assert all((trainable[n] - before[n]).abs().max() > 1e-4 for n in names), part
    assert sum(".classifier." in n for n in trainable) == 2  # one copy (weight + bias), not one per adapter

    batch, labels = train_batch(data_dir, tiny_model)
    with torch.no_grad():
        loss_before = F.cross_entropy(initial(**batch).logits, labels).item()
        loss_after = F.cross_entropy(model(**batch).logits, labels).item()
    assert loss_after < loss_before - 1e-3, (loss_before, loss_after)


def test_each_part_loads_with_dt_load_and_reproduces_the_trained_logits(trained, data_dir, tiny_model):
    run_dir, model = trained
    batch, _ = train_batch(data_dir, tiny_model)
    loaded = dt.load(fresh_base(tiny_model), run_dir / "lora", name="lora")
    loaded = dt.load(loaded, run_dir / "prefix", name="prefix")
    loaded.set_adapter(["lora", "prefix"])
    loaded.eval()  # adapters added after .eval() start in training mode (dropout)
    with torch.no_grad():
        expected, got = model(**batch).logits, loaded(**batch).logits
    assert (expected - got).abs().max().item() <= 1e-5
    assert expected.std() > 0
    alone = dt.load(fresh_base(tiny_model), run_dir / "prefix", name="prefix")  # each part loads on its own
    assert alone.active_adapters == ["prefix"] and alone.count_parameters()[0] > 0


def test_eval_on_the_run_folder_reproduces_the_dev_and_test_metrics(trained, data_dir, capsys):
    run_dir, _ = trained
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run_dir), "--data", str(data_dir), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    results = json.loads((run_dir / "run.json").read_text())["results"]
    for split in ("dev", "test"):
        assert metrics[split]["accuracy"] == results[split]["accuracy"]
        assert metrics[split]["loss"] == pytest.approx(results[split]["loss"], abs=1e-6)
    assert results["dev"]["accuracy"] == results["best_dev"]


def test_inspect_lists_every_part(trained, capsys):
    run_dir, _ = trained
    assert main(["inspect", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "stack of 2 PEFT-layout adapters, active together: lora, prefix" in text
    assert "adapter 'lora'" in text and "adapter 'prefix'" in text and "run: lora+prefix status done" in text
    counts = [int(line.split(":")[1].replace(",", "")) for line in text.splitlines() if line.strip().startswith("parameters")]
    assert len(counts) == 3 and counts[2] == counts[0] + counts[1]
    # lora: 2 layers x 2 targets x (A 4x32 + B 32x4) + the classifier copy (2x32 + 2)
    assert counts[0] == 2 * 2 * 2 * 128 + 66


def test_merge_folds_lora_in_and_keeps_prefix_as_an_adapter(trained, data_dir, tiny_model, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    run_dir, _ = trained
    merged = tmp_path / "merged"
    capsys.readouterr()
    assert main(["merge", "--adapter", str(run_dir), "--out", str(merged)]) == 0
    printed = capsys.readouterr().out
    assert "adapters prefix cannot be merged and stay adapters" in printed
    stack = json.loads((merged / "stack.json").read_text())
    assert stack["adapters"] == ["prefix"] and stack["merged"] == ["lora"]
    assert (merged / "config.json").is_file() and (merged / "prefix" / "adapter_config.json").is_file()

    plain = AutoModelForSequenceClassification.from_pretrained(merged)  # W = W0 + (alpha / r) B A, head = lora's copy
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    lora = load_file(str(run_dir / "lora" / "adapter_model.safetensors"))
    checked = 0
    for name, weight in plain.named_parameters():
        path = name.rpartition(".")[0]
        key = f"base_model.model.{path}.lora_A.weight"
        if name.endswith(".weight") and key in lora:
            delta = lora[key.replace("lora_A", "lora_B")] @ lora[key] * (8 / 4)
            assert torch.allclose(weight, base.get_parameter(name) + delta, atol=1e-6)
            checked += 1
    assert checked == 4
    assert torch.equal(plain.classifier.weight, lora["base_model.model.classifier.weight"])

    # the merged folder + its prefix give the run's predictions
    preds_run, preds_merged = tmp_path / "run.jsonl", tmp_path / "merged.jsonl"
    common = ["--data", str(data_dir), "--split", "test", "--json"]
    assert main(["eval", "--adapter", str(run_dir), *common, "--predictions", str(preds_run)]) == 0
    assert main(["eval", "--adapter", str(merged), *common, "--predictions", str(preds_merged)]) == 0
    a = torch.tensor([json.loads(line)["logits"] for line in preds_run.read_text().splitlines()])
    b = torch.tensor([json.loads(line)["logits"] for line in preds_merged.read_text().splitlines()])
    assert a.shape == (32, 2) and (a - b).abs().max().item() <= 1e-5


def test_resumed_stacked_run_equals_the_uninterrupted_one(trained, data_dir, tiny_model, tmp_path):
    from safetensors.torch import load_file

    run_dir, _ = trained

    def stop_at_3(trainer, row):
        if row["step"] == 3:
            trainer.request_stop()

    out = tmp_path / "b"
    with pytest.raises(Interrupted, match="step 3/8"):
        run_training(stack_settings(data_dir, tiny_model, out), on_step=stop_at_3)
    resumed = run_training(stack_settings(data_dir, tiny_model, out, ("--resume",)))
    rows = [(run_dir / "metrics.jsonl").read_text(), (out / "metrics.jsonl").read_text()]
    strip = [[{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in r.splitlines()] for r in rows]
    assert strip[0] == strip[1] and len(strip[0]) == 8 + 2
    for part in ("lora", "prefix"):
        a, b = (load_file(str(d / part / "adapter_model.safetensors")) for d in (run_dir, out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert resumed["results"]["test"] == json.loads((run_dir / "run.json").read_text())["results"]["test"]


def test_options_split_per_part():
    configs = dict(build_configs("lora+mora+prefix", {"r": "8", "mora.r": "16", "dropout": "0.2",
                                                      "modules_to_save": "classifier"}))
    assert (configs["lora"].r, configs["mora"].r) == (8, 16)  # PART.FIELD wins over the unprefixed option
    assert configs["lora"].dropout == configs["prefix"].dropout == 0.2
    assert configs["lora"].modules_to_save == ["classifier"] and configs["mora"].modules_to_save is None
    single = build_configs("lora", {"lora.r": "2"})
    assert single[0][0] == "default" and single[0][1].r == 2


def test_config_file_maps_parts_to_options(data_dir, tiny_model, tmp_path):
    config = tmp_path / "stack.json"
    config.write_text(json.dumps({"lora": {"r": 2, "targets": ["query"]}, "prefix": {"num_virtual_tokens": 3}}))
    out = tmp_path / "run"
    assert main(["train", "--data", str(data_dir), "--model", tiny_model, "--config", str(config),
                 "--set", "lora.alpha=4", "--max-steps", "1", "--max-length", "32", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "run.json").read_text())["settings"]["method"] == "lora+prefix"
    lora = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert (lora["r"], lora["lora_alpha"], lora["target_modules"]) == (2, 4, ["query"])
    assert json.loads((out / "prefix" / "adapter_config.json").read_text())["num_virtual_tokens"] == 3


BAD = [
    (["train", "--method", "full+lora"], "'full' is a baseline and cannot be stacked"),
    (["train", "--method", "lora+nosuch"], "unknown method 'nosuch'"),
    (["train", "--method", "lora+lora"], "lists lora twice"),
    (["train", "--method", "lora+prefix", "--set", "nosuch.r=4"], "'nosuch' is not a part of 'lora+prefix'"),
    (["train", "--method", "lora+prefix", "--set", "prefix.r=4"], "part 'prefix' of 'lora+prefix': option --r does not apply"),
    (["train", "--method", "lora+prefix", "--set", "bogus=1"], "'bogus' applies to none of the parts lora, prefix"),
    (["train", "--method", "lora+prefix", "--targets", "query"], "part 'prefix' of 'lora+prefix'"),
    (["train", "--method", "houlsby+pfeiffer", "--train-layernorms", "true"], "all train a copy of"),
    (["compare", "--methods", "lora,head+lora"], "'head' is a baseline and cannot be stacked"),
]


@pytest.mark.parametrize(("argv", "message"), BAD)
def test_bad_stacks_exit_2_with_one_line(argv, message, data_dir, tiny_model, tmp_path, capsys):
    code = main([*argv, "--data", str(data_dir), "--model", tiny_model, "--out", str(tmp_path / "x"), "--max-steps", "1",
                 "--max-length", "32", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_compare_runs_stacks_as_rows_and_merge_refuses_an_unmergeable_stack(data_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(data_dir), "--model", tiny_model, "--methods", "lora+houlsby,prefix+houlsby",
                 "--r", "4", "--set", "houlsby.bottleneck=4", "--max-steps", "2", "--max-length", "32",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("method  "):]
    assert any(line.startswith("lora+houlsby ") for line in table.splitlines())
    assert any(line.startswith("prefix+houlsby ") for line in table.splitlines())
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["method"] for r in results] == ["lora+houlsby", "prefix+houlsby"]
    assert all(r["test_metric"] is not None and r["adapter_bytes"] > 0 for r in results)
    assert json.loads((out / "lora+houlsby" / "lora" / "adapter_config.json").read_text())["r"] == 4
    for entry in ("lora+houlsby", "prefix+houlsby"):
        assert json.loads((out / entry / "houlsby" / "adapter_config.json").read_text())["bottleneck_size"] == 4
    assert (out / "metric_vs_params.png").is_file() and "| prefix+houlsby |" in (out / "report.md").read_text()
    code = main(["merge", "--adapter", str(out / "prefix+houlsby"), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "none of the adapters prefix, houlsby" in err and len(err.splitlines()) == 1


def test_compare_gives_a_stack_config_file_to_the_stack_entry(data_dir, tiny_model, tmp_path, monkeypatch):
    import deltatune.compare as compare_module

    config = tmp_path / "stack.json"
    config.write_text(json.dumps({"lora": {"r": 2}, "prefix": {"num_virtual_tokens": 3}}))
    seen = {}
    monkeypatch.setattr(compare_module, "compare", lambda settings, methods, out, debug, **kw: seen.update(s=settings, m=methods))
    assert main(["compare", "--data", str(data_dir), "--model", tiny_model, "--methods", "lora,lora+prefix",
                 "--config", str(config), "--out", str(tmp_path / "c")]) == 0
    plans = compare_module.method_settings(seen["s"], seen["m"], tmp_path / "c")
    assert plans["lora"].config_values == {} and plans["lora+prefix"].config_values["prefix"] == {"num_virtual_tokens": 3}
    configs = dict(build_configs("lora+prefix", plans["lora+prefix"].method_options, plans["lora+prefix"].config_values))
    assert (configs["lora"].r, configs["prefix"].num_virtual_tokens) == (2, 3)
