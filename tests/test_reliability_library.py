"""Issue 19, library classes 1-4: a failed load changes nothing; non-finite numbers are refused where they enter;
sizes are bounded and checked against the file before anything is allocated; a wrapped base cannot be wrapped again."""

from __future__ import annotations

import copy
import json
import math
import tracemalloc
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import deltatune as dt
from conftest import MLP
from deltatune.config import MAX_SIZE, check_positive
from deltatune.io import CONFIG_NAME, WEIGHTS_NAME

HYPO = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
PREFIX = "base_model.model."


def fresh_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def saved(path, **config):
    """An adapter folder: LoRA on fc1 (+ embed) with fc2 as a modules_to_save head, random non-zero weights."""
    options = {"targets": ["fc1"], "modules_to_save": ["fc2"], "init": "random", "r": 2, **config}
    model = dt.wrap(fresh_mlp(1), dt.LoraConfig(**options))
    model.save(path)
    return path


def snapshot(model: torch.nn.Module) -> dict:
    """Every module object, parameter object, value, requires_grad flag and training flag of ``model``."""
    return {
        "modules": {n: id(m) for n, m in model.named_modules()},
        "params": {n: (id(p), p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def assert_same(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["training"] == before["training"]
    assert set(after["params"]) == set(before["params"])
    for name, (ident, flag, value) in before["params"].items():
        ident2, flag2, value2 = after["params"][name]
        assert (ident2, flag2) == (ident, flag), name
        assert torch.equal(value2, value), name
    for name, value in before["buffers"].items():
        assert torch.equal(after["buffers"][name], value), name


def damage(path, kind: str, key_index: int) -> str:
    """Break the folder at ``path`` in one way; returns the message the refusal must contain."""
    tensors = load_file(path / WEIGHTS_NAME)
    keys = sorted(tensors)
    key = keys[key_index % len(keys)]
    config = json.loads((path / CONFIG_NAME).read_text())
    if kind == "shape":
        tensors[key] = torch.zeros(tensors[key].numel() + 1)
        message = "shape mismatch"
    elif kind == "missing":
        del tensors[key]
        message = "missing tensors"
    elif kind == "extra":
        tensors[PREFIX + "fc9.lora_A.weight"] = torch.zeros(2, 16)
        message = "unexpected tensors"
    elif kind == "dtype":
        tensors[key] = tensors[key].to(torch.int32)
        message = "floating point"
    elif kind in ("nan", "inf"):
        tensors[key].view(-1)[key_index % tensors[key].numel()] = float(kind)
        message = "NaN/inf"
    elif kind == "truncated":
        (path / WEIGHTS_NAME).write_bytes((path / WEIGHTS_NAME).read_bytes()[:-7])
        return "not a readable safetensors"
    else:  # the config asks for a rank the file does not hold
        config["r"] = 3
        (path / CONFIG_NAME).write_text(json.dumps(config))
        return "shape mismatch|r = 3"
    save_file(tensors, path / WEIGHTS_NAME)
    return message


# ---- class 1: a failed load leaves the model exactly as it was -------------------------------------------------------
@HYPO
@given(kind=st.sampled_from(["shape", "missing", "extra", "dtype", "nan", "inf", "truncated", "rank"]),
       key_index=st.integers(0, 50), onto_wrapped=st.booleans())
def test_failed_load_changes_no_module_parameter_value_or_flag(tmp_path_factory, kind, key_index, onto_wrapped):
    path = saved(tmp_path_factory.mktemp("adapter"))
    message = damage(path, kind, key_index)
    base = fresh_mlp()
    base.fc1.weight.requires_grad_(False)  # a flag the user set must survive too
    target = dt.wrap(base, dt.LoraConfig(targets=["fc1"], modules_to_save=["fc2"]), "other") if onto_wrapped else base
    if onto_wrapped:  # the user froze part of the active adapter: a failed load must not unfreeze it
        next(p for n, p in target.named_parameters() if "lora_A" in n).requires_grad_(False)
    head = target.fc2
    optimizer = torch.optim.SGD([p for p in target.parameters() if p.requires_grad], lr=0.1)
    before = snapshot(target)
    with pytest.raises(dt.DeltatuneError, match=message):
        dt.load(target, path, name="new")
    assert_same(target, before)
    assert target.fc2 is head
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in target.parameters() if p.requires_grad}  # the optimizer still trains the model


def test_issue_case_modules_to_save_head_is_not_replaced(tmp_path, bert):
    """The exact report: a plain classifier model, an adapter with modules_to_save=[classifier] whose head tensor
    has the wrong shape; the classifier object and every requires_grad flag stay."""
    dt.wrap(copy.deepcopy(bert), dt.LoraConfig(r=2, targets=["query", "value"], modules_to_save=["classifier"])).save(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors[PREFIX + "classifier.bias"] = torch.zeros(5, 5)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    head, before = bert.classifier, snapshot(bert)
    with pytest.raises(dt.AdapterFileError, match="shape mismatch for classifier.bias"):
        dt.load(bert, tmp_path)
    assert bert.classifier is head
    assert_same(bert, before)


# ---- class 2: non-finite numbers are refused where they enter ---------------------------------------------------
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
FLOAT_FIELDS = [
    (dt.LoraConfig, "alpha"), (dt.LoraConfig, "dropout"), (dt.DoraConfig, "alpha"), (dt.DoraConfig, "dropout"),
    (dt.AsyLoraConfig, "alpha"), (dt.MoraConfig, "dropout"), (dt.PrefixTuningConfig, "dropout"),
    (dt.PTuningConfig, "encoder_dropout"), (dt.AdapterConfig, "reduction_factor"),
]


@HYPO
@given(field=st.sampled_from(FLOAT_FIELDS), value=NON_FINITE)
def test_config_fields_refuse_non_finite_values_by_name(field, value):
    cls, name = field
    with pytest.raises(dt.ConfigError, match=rf"{name}.*(finite|number)"):
        cls(**{name: value})


@HYPO
@given(value=NON_FINITE, allow_zero=st.booleans())
def test_check_positive_refuses_nan_and_inf(value, allow_zero):
    with pytest.raises(dt.ConfigError, match="must be a number"):
        check_positive("x", value, allow_zero=allow_zero)


@HYPO
@given(value=NON_FINITE, key=st.sampled_from(["query", "fc1"]))
def test_nested_config_values_refuse_non_finite(value, key):
    with pytest.raises(dt.ConfigError, match=rf"alpha_pattern\['{key}'\] must be a finite number"):
        dt.LoraConfig(alpha_pattern={key: value})


@HYPO
@given(value=NON_FINITE, key=st.sampled_from(["lora_alpha", "lora_dropout"]))
def test_adapter_config_files_refuse_non_finite(tmp_path_factory, value, key):
    path = saved(tmp_path_factory.mktemp("cfg"))
    config = json.loads((path / CONFIG_NAME).read_text())
    config[key] = value
    (path / CONFIG_NAME).write_text(json.dumps(config))  # json writes NaN / Infinity, and Python reads them back
    model = fresh_mlp()
    before = snapshot(model)
    with pytest.raises(dt.ConfigError, match="finite|number"):
        dt.load(model, path)
    assert_same(model, before)


def test_base_layer_weight_of_a_linear_is_refused_not_written(tmp_path):
    saved(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors[PREFIX + "fc1.base_layer.weight"] = torch.full((32, 16), 7.0)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    model = fresh_mlp()
    before = snapshot(model)
    with pytest.raises(dt.AdapterFileError, match="unexpected tensors.*fc1.base_layer.weight"):
        dt.load(model, tmp_path)
    assert_same(model, before)


@pytest.mark.parametrize("fill", [math.nan, math.inf])
def test_base_layer_weight_of_an_embedding_refuses_non_finite(tmp_path, fill):
    saved(tmp_path, targets=["embed", "fc1"])
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors[PREFIX + "embed.base_layer.weight"] = torch.full((50, 16), fill)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    model = fresh_mlp()
    before = snapshot(model)
    with pytest.raises(dt.AdapterFileError, match="embed.base_layer.weight .*NaN/inf"):
        dt.load(model, tmp_path)
    assert_same(model, before)


def test_base_layer_weight_of_an_embedding_warns_when_it_changes_the_base(tmp_path):
    saved(tmp_path, targets=["embed", "fc1"])
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    new_table = torch.randn(50, 16)
    tensors[PREFIX + "embed.base_layer.weight"] = new_table
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    model = fresh_mlp()
    with pytest.warns(UserWarning, match="replaces frozen base weights embed.base_layer.weight"):
        loaded = dt.load(model, tmp_path)
    assert torch.equal(loaded.model.embed.weight, new_table)
    tensors[PREFIX + "embed.base_layer.weight"] = fresh_mlp().embed.weight.detach().clone()  # same as the base
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dt.load(fresh_mlp(), tmp_path)


# ---- class 3: sizes are bounded and checked before anything is allocated ----------------------------------------
@HYPO
@given(r=st.sampled_from([10**6, 10**9, 10**12, 10**15, MAX_SIZE + 1]),
       field=st.sampled_from(["r", "rank_pattern"]))
def test_adapter_config_asking_for_a_huge_rank_is_refused_before_allocating(tmp_path_factory, r, field):
    path = saved(tmp_path_factory.mktemp("big"))
    config = json.loads((path / CONFIG_NAME).read_text())
    config[field] = r if field == "r" else {"fc1": r}
    (path / CONFIG_NAME).write_text(json.dumps(config))
    model = fresh_mlp()
    before = snapshot(model)
    tracemalloc.start()
    try:
        with pytest.raises(dt.DeltatuneError, match=r"larger than any adapter needs|no tensor in .* has a dimension"):
            dt.load(model, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20  # refused before the allocator was asked for r x 16 floats
    assert_same(model, before)


@pytest.mark.parametrize("r", [33, 1000, 10**6])
def test_rank_above_the_layer_size_is_refused_before_allocating(r):
    model = fresh_mlp()
    before = snapshot(model)
    with pytest.raises(dt.TargetError, match=rf"r = {r} for .fc1. is larger than the layer"):
        dt.wrap(model, dt.LoraConfig(r=r, targets=["fc1"]))
    assert_same(model, before)
    dt.wrap(model, dt.LoraConfig(r=32, targets=["fc1"]))  # the largest dimension is still allowed


@pytest.mark.parametrize("depth", [40, 1000, 100_000])
def test_deeply_nested_adapter_config_is_a_clear_error(tmp_path, depth):
    saved(tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"peft_type": "LORA", "rank_pattern": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(dt.DeltatuneError, match="nested"):
        dt.load(fresh_mlp(), tmp_path)


@pytest.mark.parametrize("field,value,message", [
    ("layers", [10**12], "larger than any adapter needs"),
    ("rank_pattern", {"fc1": -(10**15)}, "larger than any adapter needs"),
    ("layers_pattern", [[[[[["x"]]]]]] * 2, "nested|layers_pattern"),
])
def test_config_values_are_bounded(field, value, message):
    if field == "layers_pattern":
        for _ in range(40):
            value = [value]
        message = "nested more than"
    with pytest.raises(dt.ConfigError, match=message):
        dt.LoraConfig(**{field: value})


# ---- class 4: a wrapped base cannot be wrapped again -------------------------------------------------------------
def test_wrapping_a_wrapped_base_again_is_refused_and_changes_nothing(tmp_path):
    base = fresh_mlp()
    first = dt.wrap(base, dt.LoraConfig(targets=["fc1"], init="random"))
    x = torch.randint(0, 50, (2, 5))
    expected = first(x).detach().clone()
    before = snapshot(first)
    for attempt in (lambda: dt.wrap(base, dt.LoraConfig(targets=["fc2"])),
                    lambda: dt.wrap(base, dt.DoraConfig(targets=["fc1"])),
                    lambda: dt.load(base, saved(tmp_path))):
        with pytest.raises(dt.ConfigError, match="already a DeltaModel or wrapped by one"):
            attempt()
        assert_same(first, before)
        assert torch.equal(first(x), expected)


def test_a_copy_or_an_unloaded_base_can_be_wrapped():
    base = fresh_mlp()
    first = dt.wrap(base, dt.LoraConfig(targets=["fc1"], init="random"))
    twin = dt.wrap(copy.deepcopy(base), dt.LoraConfig(targets=["fc2"]))  # a copy is another model
    assert twin.model is not base
    plain = first.unload()
    again = dt.wrap(plain, dt.LoraConfig(targets=["fc2"]))
    assert again.model is base


@pytest.mark.parametrize("fill", [math.nan, math.inf, -math.inf])
def test_every_reader_of_adapter_files_refuses_non_finite(tmp_path, fill):
    """The check sits in ``read_tensors``, so ``dt.load`` and the transformers-Trainer reload both refuse."""
    from deltatune.hf import load_adapter_weights

    saved(tmp_path)
    model = dt.wrap(fresh_mlp(), dt.LoraConfig(targets=["fc1"], modules_to_save=["fc2"], r=2))
    before = snapshot(model)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors[PREFIX + "fc1.lora_B.weight"][0, 0] = fill
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(dt.AdapterFileError, match="fc1.lora_B.weight .*NaN/inf"):
        load_adapter_weights(model, tmp_path)
    assert_same(model, before)
