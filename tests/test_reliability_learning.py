"""Issue 19, class 9: silent failure to learn. A fresh head does not follow a small adapter learning rate, and a run
that diverged or predicts no better than the majority class says so in the console, run.json and the compare
report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import sst2_slice
from deltatune.cli import main
from deltatune.report import report_markdown
from deltatune.train.health import FRESH_HEAD_LR, divergence, head_lr, majority_level, run_health, run_warnings

HYPO = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return sst2_slice(tmp_path_factory.mktemp("sst2"), {"train": 64, "dev": 32, "test": 40})


def history(losses: list[float]) -> list[dict]:
    return [{"type": "train", "step": i + 1, "loss": v} for i, v in enumerate(losses)]


# ---- the fresh head's learning rate -------------------------------------------------------------------------------
@HYPO
@given(lr=st.floats(1e-6, 1e-1), given_lr=st.none() | st.floats(1e-6, 1.0), fresh=st.booleans(), baseline=st.booleans())
def test_fresh_head_never_trains_slower_than_the_floor_unless_asked(lr, given_lr, fresh, baseline):
    chosen = head_lr(given_lr, lr, fresh, baseline)
    effective = chosen if chosen is not None else lr
    if given_lr is not None:
        assert chosen == given_lr  # --head-lr always wins
    elif fresh and not baseline:
        assert effective == max(lr, FRESH_HEAD_LR)
    else:
        assert chosen is None  # baselines and pretrained heads keep --lr


def test_cli_run_records_and_announces_the_head_lr(tmp_path, capsys, data_dir, tiny_model):
    out = tmp_path / "run"
    argv = ["train", "--data", str(data_dir), "--model", tiny_model, "--lr", "2e-4", "--max-steps", "2",
            "--max-length", "32", "--out", str(out)]
    assert main(argv) == 0
    assert f"head lr {FRESH_HEAD_LR:g}" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert (run["lr"], run["head_lr"]) == (2e-4, FRESH_HEAD_LR)
    assert main([*argv[:-2], "--head-lr", "1e-4", "--out", str(tmp_path / "given"), "--quiet"]) == 0
    assert json.loads((tmp_path / "given" / "run.json").read_text())["head_lr"] == 1e-4


# ---- divergence -----------------------------------------------------------------------------------------------------
@HYPO
@given(start=st.floats(0.1, 10), steps=st.integers(4, 60), decay=st.floats(0.0, 0.2))
def test_a_falling_or_flat_loss_is_not_divergence(start, steps, decay):
    assert divergence(history([start * (1 - decay) ** i for i in range(steps)]), 1e-3) is None


@HYPO
@given(start=st.floats(0.1, 10), steps=st.integers(8, 60), factor=st.floats(2.0, 1e5))
def test_a_rising_loss_is_divergence_with_a_lower_lr_to_try(start, steps, factor):
    losses = [start] * (steps // 2) + [start * factor] * (steps - steps // 2)
    warning = divergence(history(losses), 1e3)
    assert warning is not None and "diverged" in warning and "--lr 100" in warning


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_late_loss_is_divergence(bad):
    assert "diverged" in divergence(history([0.7] * 6 + [bad] * 6), 0.1)


# ---- predictions no better than the majority class -------------------------------------------------------------------
@HYPO
@given(n=st.integers(20, 300), share=st.floats(0.5, 0.9), cls=st.integers(0, 1))
def test_predicting_one_class_is_reported_as_collapse(n, share, cls):
    ones = int(n * share)
    labels = [1] * ones + [0] * (n - ones)
    warning = majority_level([cls] * n, labels, ["negative", "positive"], "test")
    assert warning is not None and "no better than always predicting the majority class" in warning
    assert f"collapsed to one class (100% are '{['negative', 'positive'][cls]}')" in warning


@HYPO
@given(n=st.integers(40, 300), errors=st.floats(0.0, 0.3))
def test_a_model_clearly_above_the_majority_is_not_flagged(n, errors):
    labels = [i % 2 for i in range(n)]
    wrong = int(n * errors)
    predictions = [1 - t if i < wrong else t for i, t in enumerate(labels)]
    assert majority_level(predictions, labels, None, "test") is None


def test_chance_level_guessing_is_flagged_without_collapse():
    labels = [i % 2 for i in range(100)]
    predictions = [(i // 2) % 2 for i in range(100)]  # 50% right, both classes predicted
    warning = majority_level(predictions, labels, None, "dev")
    assert "dev accuracy 0.500" in warning and "guesses" in warning


def test_run_warnings_gather_both_kinds():
    labels = [0, 1] * 20
    found = run_warnings(history([0.7] * 5 + [50.0] * 5), 1.0, {"predictions": [0] * 40}, labels, ["a", "b"], "test")
    assert len(found) == 2 and "diverged" in found[0] and "collapsed" in found[1]
    assert run_warnings(history([0.7, 0.6, 0.5, 0.4]), 1.0, {"predictions": labels}, labels, None, "test") == []


# ---- where the warnings show up -------------------------------------------------------------------------------------
def test_a_run_that_learns_nothing_warns_in_console_and_run_json(tmp_path, capsys, data_dir, tiny_model):
    out = tmp_path / "run"
    # one step at a tiny rate for adapters and head: the model cannot beat the majority class
    code = main(["train", "--data", str(data_dir), "--model", tiny_model, "--lr", "1e-7", "--head-lr", "1e-7",
                 "--max-steps", "1", "--max-length", "32", "--out", str(out), "--quiet"])
    assert code == 0
    err = capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done"
    assert run["results"]["warnings"] and "majority class" in run["results"]["warnings"][0]
    assert f"deltatune: warning: {run['results']['warnings'][0]}" in err


def test_a_diverging_run_is_stopped_or_flagged(tmp_path, capsys, data_dir, tiny_model):
    out = tmp_path / "run"
    code = main(["train", "--data", str(data_dir), "--model", tiny_model, "--lr", "1e3", "--max-steps", "8",
                 "--max-grad-norm", "0", "--max-length", "32", "--out", str(out), "--quiet"])
    run = json.loads((out / "run.json").read_text())
    if code == 1:  # the loss became NaN/inf: the trainer stops and records the failure
        assert run["status"] == "failed" and "Lower --lr" in run["error"]
    else:  # finite but exploded: recorded as done, with the warning
        assert code == 0 and any("diverged" in w for w in run["results"]["warnings"])
        assert "diverged" in capsys.readouterr().err


def test_compare_report_lists_the_warnings():
    results = [{"method": "lora", "trainable_params": 10, "total_params": 100, "trainable_pct": 10.0, "metric": "accuracy",
                "test_metric": 0.5, "best_dev": 0.5, "s_per_step": 0.1, "train_time_s": 1.0, "peak_rss_bytes": 1, "adapter_bytes": 1,
                "warnings": ["test accuracy 0.500 is no better than always predicting the majority class"]},
               {"method": "head", "trainable_params": 1, "total_params": 100, "trainable_pct": 1.0, "metric": "accuracy",
                "test_metric": 0.8, "best_dev": 0.8, "s_per_step": 0.1, "train_time_s": 1.0, "peak_rss_bytes": 1, "adapter_bytes": 1,
                "warnings": []}]
    report = report_markdown(results, {"data": "d", "model": "m"}, "accuracy", [])
    assert "## warnings" in report
    assert "- **lora**: test accuracy 0.500 is no better than always predicting the majority class" in report
    assert "**head**" not in report


# ---- a run that diverges with a finite loss, or collapses, says so; dev-only data gets the majority check too ----------
@pytest.mark.parametrize("losses", [
    [0.7] * 4 + [70.0] * 4 + [0.7] * 12,  # a 100x spike that came back down
    [0.69, 0.7, 0.68, 0.69, 9.0, 12.0, 8.0, 0.69, 0.7, 0.69, 0.7, 0.7],  # a >10x spike
])
def test_a_spike_that_came_back_down_is_still_divergence(losses):
    warning = divergence(history(losses), 0.5)
    assert warning.startswith("training diverged on the way") and "--lr 0.05" in warning


def test_dev_accuracy_collapse_is_divergence_and_names_the_kept_step():
    evals = [{"type": "eval", "step": s, "accuracy": a} for s, a in ((10, 0.6), (20, 0.85), (30, 0.5))]
    health, warnings = run_health(history([0.7, 0.6, 0.5, 0.4]) + evals, 1e-2, None, None, None, "dev")
    assert health == "diverged" and "collapsed from 0.850 (step 20) to 0.500 (step 30)" in warnings[0]
    assert "weights of step 20 are kept" in warnings[0]
    steady = [{"type": "eval", "step": s, "accuracy": a} for s, a in ((10, 0.8), (20, 0.85), (30, 0.8))]
    assert run_health(history([0.7, 0.6, 0.5, 0.4]) + steady, 1e-2, None, None, None, "dev") == ("ok", [])


def test_health_kinds():
    labels = [0, 1] * 20
    assert run_health(history([0.7] * 8), 1.0, {"predictions": [1] * 40}, labels, None, "dev")[0] == "learned nothing"
    assert run_health(history([0.7] * 4 + [50.0] * 4), 1.0, {"predictions": labels}, labels, None, "dev")[0] == "diverged"
    assert run_health(history([0.7, 0.5, 0.4, 0.3]), 1.0, {"predictions": labels}, labels, None, "dev") == ("ok", [])


def test_a_run_without_a_test_split_checks_the_majority_on_dev(tmp_path, capsys, tiny_model):
    data = sst2_slice(tmp_path / "devonly", {"train": 64, "dev": 40})
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--model", tiny_model, "--lr", "1e-7", "--head-lr", "1e-7",
                 "--max-steps", "1", "--max-length", "32", "--out", str(out), "--quiet"])
    run = json.loads((out / "run.json").read_text())
    assert code == 0 and run["status"] == "done" and run["results"]["health"] == "learned nothing"
    assert run["results"]["warnings"][0].startswith("dev accuracy") and "majority class" in run["results"]["warnings"][0]
    assert "deltatune: warning: dev accuracy" in capsys.readouterr().err


# ---- checkpoints of runs from before the fresh-head floor (or under the older 3e-3 floor) resume exactly ----------------
def _old_style_run(settings, monkeypatch, era: str, stop_at: int | None):
    """A run trained the way older deltatune did: the head at --lr ("no floor") or at max(--lr, 3e-3)."""
    import deltatune.train.health as health_module
    import deltatune.train.run as run_module
    from deltatune.train.run import run_training

    with monkeypatch.context() as patch:
        if era == "no floor":
            patch.setattr(run_module, "head_lr", lambda given, lr, fresh, baseline: given)
        else:
            patch.setattr(health_module, "FRESH_HEAD_LR", 3e-3)

        def stop(trainer, row):
            if row["step"] == stop_at:
                trainer.request_stop()
        return run_training(settings, on_step=stop if stop_at else None)


@pytest.mark.parametrize("era", ["no floor", "3e-3 floor"])
def test_old_checkpoints_resume_exactly_with_the_head_lr_they_were_started_with(tmp_path, monkeypatch, data_dir,
                                                                               tiny_model, era):
    import dataclasses

    from deltatune.train.settings import RunSettings
    from deltatune.train.trainer import Interrupted

    base = RunSettings(data=str(data_dir), model=tiny_model, method="lora", lr=1e-3, max_steps=4, save_every=2,
                       batch_size=16, max_length=32, quiet=True, out=str(tmp_path / "whole"))
    whole = _old_style_run(base, monkeypatch, era, None)
    cut = dataclasses.replace(base, out=str(tmp_path / "cut"))
    with pytest.raises(Interrupted):
        _old_style_run(cut, monkeypatch, era, 2)
    assert main(["train", "--settings-file", _settings_file(tmp_path, cut)]) == 0  # today's code
    resumed = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert resumed["head_lr"] == whole["head_lr"] == (1e-3 if era == "no floor" else 3e-3)
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / n / "metrics.jsonl").read_text().splitlines())
               if r["type"] == "train"] for n in ("whole", "cut")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert resumed["results"]["test"] == whole["results"]["test"]


def _settings_file(tmp_path, settings) -> str:
    """``settings`` with resume on, as the file ``train --settings-file`` reads (what ``compare`` runs)."""
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({**settings.to_dict(), "resume": True}))
    return str(path)


def test_a_checkpoint_whose_optimizer_groups_differ_is_refused_in_one_line(tmp_path, capsys, monkeypatch, data_dir,
                                                                           tiny_model):
    from deltatune.train.settings import RunSettings
    from deltatune.train.trainer import Interrupted

    cut = RunSettings(data=str(data_dir), model=tiny_model, method="lora", lr=1e-3, max_steps=4, save_every=2,
                      batch_size=16, max_length=32, quiet=True, out=str(tmp_path / "cut"))
    with pytest.raises(Interrupted):
        _old_style_run(cut, monkeypatch, "no floor", 2)
    record = json.loads((tmp_path / "cut" / "run.json").read_text())
    record["head_lr"] = 5e-2  # a run.json that does not match its checkpoint (edited, or from another tool)
    (tmp_path / "cut" / "run.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["train", "--settings-file", _settings_file(tmp_path, cut)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "parameter groups" in err and "--overwrite" in err, err
