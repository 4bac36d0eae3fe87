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
from deltatune.train.health import FRESH_HEAD_LR, divergence, head_lr, majority_level, run_warnings

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
