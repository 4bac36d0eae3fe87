"""``deltatune combine`` end to end: two runs trained by the CLI, combined, evaluated with ``deltatune eval``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import sst2_slice
from deltatune.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model) -> tuple[Path, dict[str, Path]]:
    """The SST-2 slice, and two LoRA runs on it with different ranks and targets."""
    data = sst2_slice(tmp_path_factory.mktemp("sst2c"), {"train": 64, "dev": 32, "test": 32})
    folder = tmp_path_factory.mktemp("combine_runs")
    out = {}
    for name, extra in (("a", ["--r", "4", "--targets", "query,value"]), ("b", ["--r", "2", "--targets", "query,dense"])):
        out[name] = folder / name
        assert main(["train", "--data", str(data), "--model", tiny_model, "--method", "lora", *extra, "--max-steps", "3",
                     "--batch-size", "16", "--lr", "0.02", "--max-length", "32", "--seed", str(len(out)),
                     "--out", str(out[name]), "--quiet"]) == 0
    return data, out


def eval_json(adapter: Path, data: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["eval", "--adapter", str(adapter), "--data", str(data), "--split", "test", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["test"]


def test_combine_writes_an_adapter_that_eval_takes(runs, tmp_path, capsys) -> None:
    data, folders = runs
    pairs = [f"a={folders['a']}", f"b={folders['b']}"]
    # weight 0 for b and a's head: adapter a (up to float rounding of s B A), so a's test metrics
    assert main(["combine", "--adapters", *pairs, "--weights", "1,0", "--type", "cat", "--head-from", "a",
                 "--out", str(tmp_path / "only_a")]) == 0
    assert "relative error 0" in capsys.readouterr().out
    assert eval_json(tmp_path / "only_a", data, capsys) == pytest.approx(eval_json(folders["a"], data, capsys), abs=1e-5)
    config = json.loads((tmp_path / "only_a" / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["modules_to_save"] == ["classifier"] and config["peft_type"] == "LORA"
    assert main(["combine", "--adapters", *pairs, "--type", "ties_svd", "--density", "0.5", "--rank", "2",
                 "--head-from", "b", "--out", str(tmp_path / "ties")]) == 0
    assert "ties_svd over" in capsys.readouterr().out
    assert 0 <= eval_json(tmp_path / "ties", data, capsys)["accuracy"] <= 1


@pytest.mark.parametrize(("extra", "message"), [
    (["--weights", "1"], "one per adapter"),
    (["--type", "ties"], "needs density"),
    ([], "--head-from|modules_to_save_from"),
])
def test_combine_bad_inputs_exit_2(runs, tmp_path, capsys, extra, message) -> None:
    _, folders = runs
    code = main(["combine", "--adapters", f"a={folders['a']}", f"b={folders['b']}", *extra, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "x").exists()


# ---- compare takes combined (or any existing) adapters as rows --------------------------------------------------------
def test_compare_rows_of_existing_adapters_equal_deltatune_eval(runs, tmp_path, capsys, tiny_model) -> None:
    data, folders = runs
    assert main(["combine", "--adapters", f"a={folders['a']}", f"b={folders['b']}", "--type", "ties_svd", "--density",
                 "0.5", "--rank", "2", "--head-from", "a", "--out", str(tmp_path / "ties")]) == 0
    out = tmp_path / "cmp"
    common = ["--data", str(data), "--model", tiny_model, "--max-length", "32"]
    assert main(["compare", *common, "--methods", "head", "--max-steps", "2", "--adapters", f"ties={tmp_path / 'ties'}",
                 f"lora_a={folders['a']}", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in summary["results"]}
    assert list(rows) == ["head", "ties", "lora_a"] and rows["ties"]["status"] == "evaluated"
    assert summary["adapters"] == {"ties": str(tmp_path / "ties"), "lora_a": str(folders["a"])}
    for name, folder in (("ties", tmp_path / "ties"), ("lora_a", folders["a"])):
        capsys.readouterr()
        assert main(["eval", "--adapter", str(folder), *common, "--json"]) == 0
        evaluated = json.loads(capsys.readouterr().out)
        assert rows[name]["dev"] == evaluated["dev"] and rows[name]["test"] == evaluated["test"]
        assert (rows[name]["best_dev"], rows[name]["test_metric"]) == (evaluated["dev"]["accuracy"], evaluated["test"]["accuracy"])
    trained = json.loads((folders["a"] / "run.json").read_text())["results"]
    assert rows["lora_a"]["trainable_params"] == trained["trainable_params"]  # the adapter file's values: LoRA + head
    assert "| ties |" in (out / "report.md").read_text()
    # without --methods, only the rows are evaluated (nothing is trained)
    assert main(["compare", *common, "--adapters", f"ties={tmp_path / 'ties'}", "--out", str(tmp_path / "only")]) == 0
    assert [r["method"] for r in json.loads((tmp_path / "only" / "results.json").read_text())["results"]] == ["ties"]
    assert sorted(p.name for p in (tmp_path / "only").iterdir() if p.is_dir()) == []


@pytest.mark.parametrize(("adapters", "message"), [
    (["x"], "NAME=DIR"),
    (["lora=DIR_A"], "given twice"),
    (["a=DIR_A", "a=DIR_B"], "given twice"),
    (["a=/no/such/folder"], "does not exist"),
    (["a=DATA"], "holds neither an adapter"),
])
def test_compare_bad_adapter_rows_fail_in_one_line_before_any_work(runs, tmp_path, capsys, adapters, message) -> None:
    data, folders = runs
    items = [a.replace("DIR_A", str(folders["a"])).replace("DIR_B", str(folders["b"])).replace("DATA", str(data))
             for a in adapters]
    code = main(["compare", "--data", str(data), "--methods", "lora", "--adapters", *items, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "x").exists()
