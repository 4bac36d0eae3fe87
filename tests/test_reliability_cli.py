"""Issue 19, CLI classes 5-8: bad options fail in one line with exit code 2 before any work; the label space is
bounded; --out never takes over folders deltatune did not write; failures are recorded; killed writes leave no
temp files behind; atomic writes give files the mode the umask asks for."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltatune as dt
from conftest import MLP, sst2_slice
from deltatune.cli import main
from deltatune.io import CONFIG_NAME, WEIGHTS_NAME
from deltatune.train.data import MAX_CLASSES, DataError, label_space
from deltatune.train.run import write_run

HYPO = settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return sst2_slice(tmp_path_factory.mktemp("sst2"), {"train": 48, "dev": 16, "test": 16})


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI; assert exit code 2 and a single stderr line with no traceback; return that line."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def train_argv(data_dir: Path, out: Path, *extra: str, model: str = "minilm") -> list[str]:
    return ["train", "--data", str(data_dir), "--model", model, "--out", str(out), "--quiet", *extra]


# ---- class 5: every option validated before any work, one line, exit 2 -------------------------------------------
FLOAT_OPTIONS = ["--epochs", "--warmup", "--lr", "--head-lr", "--weight-decay", "--max-grad-norm", "--loraplus-ratio"]


@HYPO
@given(option=st.sampled_from(FLOAT_OPTIONS), value=st.sampled_from(["inf", "-inf", "nan", "Infinity", "1e999", "-NaN"]))
def test_non_finite_float_options_fail_in_one_line_before_any_work(tmp_path_factory, capsys, option, value):
    out = tmp_path_factory.mktemp("run") / "out"
    err = one_line_error(capsys, train_argv(Path("/nonexistent-data"), out, f"{option}={value}"))
    assert f"{option} must be" in err
    assert not out.exists()  # nothing was created, nothing was read


@pytest.mark.parametrize(("extra", "message"), [
    (["--epochs", "inf"], "--epochs must be a finite number"),
    (["--warmup", "inf"], "--warmup must be a finite number"),
    (["--threads", "-3"], "--threads must be between 1"),
    (["--threads", "0"], "--threads must be between 1"),
    (["--optimizer", "sparseadam"], "--optimizer sparseadam with --optimizer-args {} cannot train these models"),
    (["--optimizer", "adamw", "--optimizer-args", '{"betas": [2, 3]}'], "cannot train these models (dense weights and biases): "),
    (["--optimizer", "nadamm"], "unknown optimizer 'nadamm'"),
    (["--optimizer", "lbfgs", "--optimizer-args", '{"lr": NaN}'], "cannot train these models"),
    (["--metric", "bleu"], "--metric 'bleu' is not computed"),
    (["--r", "1e12"], "--r '1e12' is not valid"),
    (["--r", "1000000000000"], "larger than any adapter needs"),
    (["--alpha", "nan"], "alpha must be a finite number"),
    (["--dropout", "inf"], "dropout must be a finite number"),
])
def test_bad_options_fail_in_one_line_before_any_work(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert message in one_line_error(capsys, train_argv(Path("/nonexistent-data"), out, *extra))
    assert not out.exists()


def test_out_under_a_regular_file_is_one_line(tmp_path, capsys, data_dir):
    (tmp_path / "file").write_text("x")
    err = one_line_error(capsys, train_argv(data_dir, tmp_path / "file" / "run"))
    assert "is a file, not a folder; choose another --out" in err


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, '{"lora": ' * 50_000 + "1" + "}" * 50_000])
def test_deeply_nested_config_file_is_one_line(tmp_path, capsys, content):
    (tmp_path / "c.json").write_text(content)
    err = one_line_error(capsys, train_argv(Path("/nonexistent-data"), tmp_path / "out", "--config", str(tmp_path / "c.json")))
    assert "nested" in err or "not valid JSON" in err


def adapter_folder(path: Path) -> Path:
    dt.wrap(MLP(), dt.LoraConfig(targets=["fc1"], r=2)).save(path)
    return path


def test_inspect_on_a_truncated_safetensors_file_is_one_line(tmp_path, capsys):
    folder = adapter_folder(tmp_path / "a")
    data = (folder / WEIGHTS_NAME).read_bytes()
    for cut in (7, len(data) // 2, len(data) - 3):
        (folder / WEIGHTS_NAME).write_bytes(data[:cut])
        assert "not a readable safetensors file" in one_line_error(capsys, ["inspect", str(folder)])


@pytest.mark.parametrize(("edit", "message"), [
    ({"r": 10**15}, "larger than any adapter needs"),
    ({"r": 10**6}, "no tensor in"),
    ({"rank_pattern": json.loads("[" * 100 + "]" * 100)}, "nested"),
])
def test_eval_on_oversized_or_overnested_configs_is_one_line(tmp_path, capsys, edit, message):
    folder = adapter_folder(tmp_path / "a")
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(edit)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    data = sst2_slice(tmp_path / "data", {"test": 4})  # real data: the adapter is read after the data is checked
    assert message in one_line_error(capsys, ["eval", "--adapter", str(folder), "--data", str(data), "--model", "minilm"])


def test_eval_on_a_config_nested_100000_levels_is_one_line(tmp_path, capsys):
    folder = adapter_folder(tmp_path / "a")
    (folder / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert "nested too deeply" in one_line_error(capsys, ["eval", "--adapter", str(folder), "--data", str(tmp_path)])


# ---- class 6: the label space is bounded, and the row is named ---------------------------------------------------
@HYPO
@given(label=st.integers(MAX_CLASSES, 10**15), row=st.integers(0, 30))
def test_absurd_integer_labels_are_refused_naming_the_row(label, row):
    rows = [{"label": i % 3} for i in range(31)]
    rows[row] = {"label": label}
    with pytest.raises(DataError, match=rf"train row {row} has label {label}"):
        label_space(rows, "label")


def test_too_many_distinct_string_labels_are_refused():
    rows = [{"label": f"id-{i}"} for i in range(MAX_CLASSES + 1)]
    with pytest.raises(DataError, match="distinct values"):
        label_space(rows, "label")
    assert label_space(rows[:MAX_CLASSES], "label") == sorted(f"id-{i}" for i in range(MAX_CLASSES))
    assert label_space([{"label": MAX_CLASSES - 1}], "label") == MAX_CLASSES


def test_cli_with_a_label_of_10_to_the_12_fails_in_one_line(tmp_path, capsys, data_dir):
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    rows[5]["label"] = 10**12
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = one_line_error(capsys, train_argv(folder, tmp_path / "out", "--max-steps", "1"))
    assert "train row 5 has label 1000000000000" in err


# ---- class 7: nothing lost: foreign folders refused, failures recorded --------------------------------------------
@pytest.mark.parametrize("run_json", [None, "{corrupt", "[1, 2]"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_train_refuses_an_adapter_folder_it_did_not_write(tmp_path, capsys, data_dir, run_json, overwrite):
    folder = adapter_folder(tmp_path / "adapter")
    if run_json is not None:
        (folder / "run.json").write_text(run_json)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    err = one_line_error(capsys, train_argv(data_dir, folder, "--max-steps", "1", *(["--overwrite"] if overwrite else [])))
    assert "holds files deltatune did not write" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_setup_failure_is_recorded_failed_and_the_folder_can_be_reused(tmp_path, capsys, data_dir, tiny_model):
    out = tmp_path / "run"
    out.mkdir()
    leftovers = [out / ".checkpoint.pt.k1ll3d.tmp", out / ".run.json.x8z2.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a write")
    # NF4 with a baseline is refused after the run was recorded (the model must be loaded to know)
    assert main(train_argv(data_dir, out, "--method", "full", "--quantize", "nf4", "--max-steps", "1", model=tiny_model)) == 2
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and "ConfigError" in run["error"]
    assert not any(p.exists() for p in leftovers)  # the run cleaned what killed writes left
    capsys.readouterr()
    assert main(train_argv(data_dir, out, "--method", "lora", "--max-steps", "1", "--max-length", "32", model=tiny_model)) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "done"


# ---- class 8: modes of atomically written files follow the umask ------------------------------------------------
@HYPO
@given(umask=st.sampled_from([0o002, 0o022, 0o027, 0o077, 0o000]))
def test_atomic_writes_get_the_mode_the_umask_asks_for(tmp_path_factory, umask):
    folder = tmp_path_factory.mktemp("modes")
    old = os.umask(umask)
    try:
        dt.wrap(MLP(), dt.LoraConfig(targets=["fc1"], r=2)).save(folder / "adapter")
        write_run(folder, {"status": "done"})
    finally:
        os.umask(old)
    for path in [folder / "adapter" / WEIGHTS_NAME, folder / "adapter" / CONFIG_NAME, folder / "run.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert not [p for p in folder.rglob(".*.tmp")]


def test_compare_refuses_an_out_folder_it_did_not_write(tmp_path, capsys, data_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "lora").mkdir()
    (out / "lora" / "settings.json").write_text("{}")  # a folder compare itself made is fine
    argv = ["compare", "--methods", "head,lora", "--data", str(data_dir), "--out", str(out), "--max-steps", "1", "--quiet"]
    assert "holds files deltatune did not write (notes.txt)" in one_line_error(capsys, argv)
    assert (out / "notes.txt").read_text() == "my notes" and not (out / "head").exists()


@pytest.mark.parametrize("damage", ["nan", "truncated"])
def test_eval_of_a_baseline_run_with_bad_weights_is_one_line(tmp_path, capsys, data_dir, tiny_model, damage):
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path / "head"
    assert main(train_argv(data_dir, out, "--method", "head", "--max-steps", "1", "--max-length", "32", model=tiny_model)) == 0
    weights = out / "baseline.safetensors"
    if damage == "nan":
        tensors = load_file(weights)
        key = sorted(tensors)[0]
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        save_file(tensors, weights)
        message = "NaN/inf"
    else:
        weights.write_bytes(weights.read_bytes()[:-5])
        message = "not a readable safetensors file"
    capsys.readouterr()
    assert message in one_line_error(capsys, ["eval", "--adapter", str(out), "--data", str(data_dir)])


# ---- class 8: a model.save() killed mid-write anywhere (not only in a run folder) leaves no lasting temp files --------
KILLED_SAVE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import safetensors.torch
import deltatune as dt
from conftest import MLP

def dying_save(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)

safetensors.torch.save_file = dying_save
dt.wrap(MLP(), dt.LoraConfig(targets=["fc1"], r=2)).save({folder!r})
"""


@pytest.mark.parametrize("existing", [False, True])
def test_temp_files_of_a_killed_save_are_removed_by_the_next_save_there(tmp_path, existing):
    import subprocess
    import sys

    folder = tmp_path / "somewhere" / "adapter"  # any folder: no run owns it
    model = dt.wrap(MLP(), dt.LoraConfig(targets=["fc1"], r=2))
    if existing:
        model.save(folder)
    script = KILLED_SAVE.format(tests=str(Path(__file__).parent), folder=str(folder))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    stale = []
    for _ in range(2):  # two killed writers: the second removes the first one's leftover before it dies
        assert subprocess.run([sys.executable, "-c", script], env=env).returncode == -9
        stale.append(sorted(folder.glob(".*.tmp")))
    assert [len(found) for found in stale] == [1, 1] and stale[0] != stale[1]
    assert stale[1][0].name.startswith(f".{WEIGHTS_NAME}.")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a write in progress in a live process (or in this one) is never touched
        alive = [folder / f".{WEIGHTS_NAME}.{sleeper.pid}-abc.tmp", folder / f".{CONFIG_NAME}.{os.getpid()}-xyz.tmp"]
        for path in alive:
            path.write_text("mid-write")
        model.save(folder)
        assert sorted(folder.glob(".*.tmp")) == sorted(alive)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert dt.load(MLP(), folder).configs["default"].r == 2  # the real files are whole
    model.save(folder)  # the sleeper is gone: its file is stale now
    assert sorted(folder.glob(".*.tmp")) == [alive[1]]
