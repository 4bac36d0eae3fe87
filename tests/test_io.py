"""Adapter files: exact round trips, PEFT-style layout, atomic writes, and loaders that fail cleanly."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import deltatune as dt
from conftest import MLP
from deltatune.io import CONFIG_NAME, WEIGHTS_NAME


def fresh_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "types": {n: type(m) for n, m in model.named_modules()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def saved_adapter(tmp_path, **config):
    model = dt.wrap(fresh_mlp(), dt.LoraConfig(init="random", **{"targets": ["fc1", "fc2", "embed"], **config}))
    model.save(tmp_path)
    return model


def test_layout_is_peft_style(tmp_path):
    saved_adapter(tmp_path, r=3, alpha=6, bias="lora_only")
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert list(config) == sorted(config)
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["lora_alpha"] == 6
    assert config["target_modules"] == ["fc1", "fc2", "embed"] and config["init_lora_weights"] is False
    keys = set(load_file(tmp_path / WEIGHTS_NAME))
    assert keys == {
        "base_model.model.fc1.lora_A.weight", "base_model.model.fc1.lora_B.weight", "base_model.model.fc1.base_layer.bias",
        "base_model.model.fc2.lora_A.weight", "base_model.model.fc2.lora_B.weight", "base_model.model.fc2.base_layer.bias",
        "base_model.model.embed.lora_embedding_A", "base_model.model.embed.lora_embedding_B",
    }
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    r=st.integers(1, 6), alpha=st.floats(0.5, 64), rslora=st.booleans(),
    targets=st.lists(st.sampled_from(["fc1", "fc2", "embed"]), min_size=1, max_size=3, unique=True),
    bias=st.sampled_from(["none", "lora_only", "all"]),
)
def test_save_load_round_trip_is_exact(tmp_path_factory, r, alpha, rslora, targets, bias):
    path = tmp_path_factory.mktemp("adapter")
    model = dt.wrap(fresh_mlp(), dt.LoraConfig(r=r, alpha=alpha, rslora=rslora, targets=targets, bias=bias, init="random"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") and param.requires_grad:
                param.add_(0.5)
    ids = torch.randint(0, 50, (3, 5))
    with torch.no_grad():
        expected = model(ids)
    model.save(path)
    loaded = dt.load(fresh_mlp(), path)
    assert loaded.configs["default"] == model.configs["default"]
    with torch.no_grad():
        assert torch.equal(loaded(ids), expected)
    for key, tensor in dt.io.adapter_tensors(model, "default").items():
        assert torch.equal(dt.io.adapter_tensors(loaded, "default")[key], tensor)


def test_several_adapters_go_to_subfolders_and_load_by_name(tmp_path):
    model = dt.wrap(fresh_mlp(), dt.LoraConfig(targets=["fc1"], init="random"))
    model.add_adapter("second", dt.LoraConfig(r=2, targets=["fc2"], init="random"))
    model.save(tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / "second" / CONFIG_NAME).is_file()
    loaded = dt.load(fresh_mlp(), tmp_path)
    dt.load(loaded, tmp_path / "second", name="second")
    assert loaded.active_adapters == ["default"]
    ids = torch.randint(0, 50, (2, 4))
    for name in ("default", "second"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        with torch.no_grad():
            assert torch.equal(model(ids), loaded(ids))


def test_unknown_config_keys_warn_once_and_load(tmp_path):
    saved_adapter(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config.update(some_future_key=1, another=True)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="ignoring unknown adapter config keys: another, some_future_key") as record:
        dt.load(fresh_mlp(), tmp_path)
    assert len([w for w in record if "unknown adapter config" in str(w.message)]) == 1


def test_unsupported_peft_feature_is_refused(tmp_path):
    saved_adapter(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["lora_bias"] = True
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(dt.ConfigError, match="lora_bias=True, a PEFT feature deltatune does not support"):
        dt.load(fresh_mlp(), tmp_path)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: os.remove(d / WEIGHTS_NAME), "no adapter_model.safetensors"),
        (lambda d: os.remove(d / CONFIG_NAME), "no adapter_config.json"),
        (lambda d: (d / CONFIG_NAME).write_text("{not json"), "not valid JSON"),
        (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:50]), "not a readable safetensors"),
        (lambda d: _edit_tensors(d, drop="base_model.model.fc1.lora_B.weight"), "1 missing tensors"),
        (lambda d: _edit_tensors(d, add="base_model.model.fc9.lora_A.weight"), "1 unexpected tensors"),
        (lambda d: _edit_tensors(d, resize="base_model.model.fc1.lora_A.weight"), "shape mismatch"),
        (lambda d: _edit_config(d, r=0), "r must be a positive integer"),
        (lambda d: _edit_config(d, peft_type="NOPE"), "peft_type 'NOPE' is not supported"),
        (lambda d: _edit_config(d, target_modules=["fc7"]), "'fc7' matched no module; closest: fc2, fc1"),
        (lambda d: _edit_config(d, rank_pattern=5), "invalid adapter config|rank_pattern"),
    ],
)
def test_bad_files_raise_clear_errors_and_leave_the_model_as_it_was(tmp_path, damage, message):
    saved_adapter(tmp_path)
    damage(tmp_path)
    for target in (fresh_mlp(), dt.wrap(fresh_mlp(), dt.LoraConfig(targets=["fc1"], bias="all"), name="other")):
        before = snapshot(target)
        with pytest.raises(dt.DeltatuneError, match=message):
            dt.load(target, tmp_path, name="new")
        assert_unchanged(target, before)


def test_failed_load_restores_base_biases(tmp_path):
    saved_adapter(tmp_path, bias="all")
    _edit_tensors(tmp_path, resize="base_model.model.fc2.lora_B.weight")  # sorted after the biases
    model = fresh_mlp()
    before = snapshot(model)
    with pytest.raises(dt.AdapterFileError, match="shape mismatch"):
        dt.load(model, tmp_path)
    assert_unchanged(model, before)


def test_adapter_for_another_base_is_refused(tmp_path, llama, gpt2):
    dt.wrap(llama, dt.LoraConfig(r=2, targets=["q_proj"])).save(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["target_modules"] = ["c_attn"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(dt.AdapterFileError, match="does not fit this model.*another base model"):
        dt.load(gpt2, tmp_path)


def test_legacy_bin_needs_opt_in(tmp_path):
    model = saved_adapter(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    os.remove(tmp_path / WEIGHTS_NAME)
    torch.save(tensors, tmp_path / "adapter_model.bin")
    with pytest.raises(dt.AdapterFileError, match="allow_bin=True"):
        dt.load(fresh_mlp(), tmp_path)
    loaded = dt.load(fresh_mlp(), tmp_path, allow_bin=True)
    ids = torch.randint(0, 50, (2, 3))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_crash_mid_save_keeps_previous_files(tmp_path, monkeypatch):
    model = saved_adapter(tmp_path)
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        model.model.fc1.adapters["default"].lora_B.weight.add_(1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("pathlib.Path.write_text", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old  # no temp files, old files intact


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), cut=st.integers(0, 2000), which=st.sampled_from(["config", "weights"]))
def test_fuzzed_files_only_raise_deltatune_errors(tmp_path_factory, data, cut, which):
    path = tmp_path_factory.mktemp("fuzz")
    saved_adapter(path)
    target = path / (CONFIG_NAME if which == "config" else WEIGHTS_NAME)
    original = target.read_bytes()
    target.write_bytes(original[: cut % (len(original) + 1)] + data)
    model = fresh_mlp()
    before = snapshot(model)
    try:
        dt.load(model, path)
    except dt.DeltatuneError:
        assert_unchanged(model, before)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
), key=st.sampled_from(["r", "lora_alpha", "target_modules", "bias", "rank_pattern", "layers_to_transform",
                         "modules_to_save", "init_lora_weights", "lora_dropout", "exclude_modules", "use_rslora"]))
def test_fuzzed_config_values_only_raise_deltatune_errors(tmp_path_factory, value, key):
    path = tmp_path_factory.mktemp("cfg")
    saved_adapter(path)
    _edit_config(path, **{key: value})
    try:
        dt.load(fresh_mlp(), path)
    except dt.DeltatuneError:
        pass


def _edit_config(directory, **changes) -> None:
    config = json.loads((directory / CONFIG_NAME).read_text())
    config.update(changes)
    (directory / CONFIG_NAME).write_text(json.dumps(config))


def _edit_tensors(directory, drop=None, add=None, resize=None) -> None:
    tensors = load_file(directory / WEIGHTS_NAME)
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.zeros(2, 2)
    if resize:
        tensors[resize] = torch.zeros(tensors[resize].shape[0] + 1, *tensors[resize].shape[1:])
    save_file(tensors, directory / WEIGHTS_NAME)
