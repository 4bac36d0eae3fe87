"""add_weighted_adapter against HF PEFT (test-only oracle): equal where PEFT is mathematically right (the ``*_svd``
types on plain LoRA), and equal to the dense reference where PEFT is not (``linear`` combines A and B separately
and adds cross terms; ``cat`` of rsLoRA adapters keeps use_rslora with r = alpha = the summed rank, so its
scaling is sqrt(r) instead of 1). A combined adapter with a rank pattern loads in PEFT and gives our outputs."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from test_weighted_adapters import IDS, dense, reference, tiny

peft = pytest.importorskip("peft")

PATHS = ["q", "v"]


def two_loras(tmp_path, rslora: bool = False) -> tuple[dt.DeltaModel, torch.nn.Module]:
    """Our model with LoRA adapters a (r=4, alpha=8) and b (r=4, alpha=2), and PEFT's model with the same two."""
    model = dt.wrap(tiny(), dt.LoraConfig(r=4, alpha=8, rslora=rslora, targets=PATHS, init="random"), "a")
    model.add_adapter("b", dt.LoraConfig(r=4, alpha=2, rslora=rslora, targets=PATHS, init="random"))
    for name in ("a", "b"):
        model.save(tmp_path / name, adapter=name)
    theirs = peft.PeftModel.from_pretrained(tiny(), str(tmp_path / "a"), adapter_name="a")
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    return model, theirs


def peft_dense(theirs: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {p: theirs.base_model.model.get_submodule(p).get_delta_weight(name).detach().double() for p in PATHS}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["svd", "ties_svd", "magnitude_prune_svd"])
def test_svd_types_equal_peft_on_plain_lora(tmp_path, kind: str) -> None:
    model, theirs = two_loras(tmp_path)
    density = None if kind == "svd" else 0.5
    weights = [1.0, 0.6]
    theirs.add_weighted_adapter(["a", "b"], weights, "m", kind, svd_rank=3, density=density)
    report = model.add_weighted_adapter(["a", "b"], weights, "m", kind, svd_rank=3, density=density)
    ours, want = dense(model, "m"), peft_dense(theirs, "m")
    for path in PATHS:
        assert rel(ours[path], want[path]) < 1e-5, path
    assert report.relative_error > 0  # rank 3 < the rank of the combination: the loss is reported, not hidden


def test_linear_equals_the_task_vector_sum_where_peft_adds_cross_terms(tmp_path) -> None:
    model, theirs = two_loras(tmp_path)
    weights = [1.0, 0.5]
    theirs.add_weighted_adapter(["a", "b"], weights, "m", "linear")
    report = model.add_weighted_adapter(["a", "b"], weights, "m", "linear", svd_rank=8)
    want = reference(model, ["a", "b"], weights)
    ours, peft_result = dense(model, "m"), peft_dense(theirs, "m")
    for path in PATHS:
        assert rel(ours[path], want[path]) < 1e-5, path
        assert rel(peft_result[path], want[path]) > 0.1, path  # (sum sqrt(w s) B)(sum sqrt(w s) A) != sum w s B A
    assert report.relative_error < 1e-5


def test_cat_of_rslora_equals_the_sum_where_peft_rescales_it(tmp_path) -> None:
    model, theirs = two_loras(tmp_path, rslora=True)
    weights = [1.0, -0.7]
    theirs.add_weighted_adapter(["a", "b"], weights, "m", "cat")
    model.add_weighted_adapter(["a", "b"], weights, "m", "cat")
    want = reference(model, ["a", "b"], weights)
    ours, peft_result = dense(model, "m"), peft_dense(theirs, "m")
    for path in PATHS:
        assert rel(ours[path], want[path]) < 1e-6, path
        assert rel(peft_result[path], want[path]) > 0.5, path  # PEFT: sqrt(8) times the sum


def test_combined_adapter_with_rank_pattern_loads_in_peft(tmp_path) -> None:
    model = dt.wrap(tiny(), dt.LoraConfig(r=2, alpha=4, targets=["q"], init="random"), "a")
    model.add_adapter("b", dt.LoraConfig(r=3, alpha=3, rslora=True, targets=["q", "v"], init="random"))
    model.add_weighted_adapter(["a", "b"], [1.0, 2.0], "ab", "cat")
    assert model.configs["ab"].r == 5 and model.configs["ab"].rank_pattern == {"v": 3}
    model.set_adapter("ab")
    model.save(tmp_path / "ab", adapter="ab")
    theirs = peft.PeftModel.from_pretrained(tiny(), str(tmp_path / "ab")).eval()
    with torch.no_grad():
        assert torch.allclose(theirs(IDS), model(IDS), atol=1e-5)
