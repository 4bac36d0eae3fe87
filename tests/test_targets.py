"""Target resolution: names, regexes, all-linear, layers, exclude, and the errors for each mistake."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import deltatune as dt
from deltatune.targets import resolve_targets


def test_names_match_whole_path_or_dotted_suffix(minilm):
    paths = resolve_targets(minilm, ["query", "attention.output.dense"])
    assert len(paths) == 12
    assert "encoder.layer.0.attention.self.query" in paths
    assert "encoder.layer.0.attention.output.dense" in paths and "encoder.layer.0.output.dense" not in paths
    # "dense" is a suffix of "attention.output.dense", "output.dense", "intermediate.dense" and "pooler.dense"
    assert len(resolve_targets(minilm, ["dense"])) == 6 * 3 + 1


def test_a_name_is_not_a_substring_match(minilm):
    with pytest.raises(dt.TargetError, match="'uery' matched no module; closest: query"):
        resolve_targets(minilm, ["uery"])


def test_regex_is_full_match(minilm):
    assert len(resolve_targets(minilm, r".*layer\.[0-2]\.attention\.self\.(query|key)")) == 6
    with pytest.raises(dt.TargetError, match="matched no module"):
        resolve_targets(minilm, r"query")  # not a full path
    with pytest.raises(dt.TargetError, match="invalid"):
        resolve_targets(minilm, r"(unclosed")


def test_layers_and_exclude(minilm, llama):
    paths = resolve_targets(minilm, "all-linear", exclude=["key"], layers=[0, 5])
    assert len(paths) == 2 * 5
    assert all(".layer.0." in p or ".layer.5." in p for p in paths)
    assert len(resolve_targets(llama, ["q_proj"], layers=[1])) == 1
    with pytest.raises(dt.TargetError, match=r"layers \[7\] do not exist; the model has blocks 0-5"):
        resolve_targets(minilm, ["query"], layers=[7])
    with pytest.raises(dt.TargetError, match="exclude 'kye' matched no module; closest: key"):
        resolve_targets(minilm, ["query"], exclude=["kye"])


def test_unsupported_types_are_named(minilm):
    with pytest.raises(dt.TargetError, match="BertSelfAttention modules, which this method cannot adapt"):
        resolve_targets(minilm, ["attention.self"])
    with pytest.raises(dt.TargetError, match="only match LayerNorm"):
        resolve_targets(minilm, r".*LayerNorm")


def test_default_targets_per_architecture(minilm, llama, gpt2, mlp):
    assert len(resolve_targets(minilm, None)) == 12
    assert all(p.endswith(("q_proj", "v_proj")) for p in resolve_targets(llama, None))
    assert all(p.endswith("c_attn") for p in resolve_targets(gpt2, None))
    with pytest.raises(dt.TargetError, match="no default targets"):
        resolve_targets(mlp, None)


class Blocks(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(4, 4), "down": nn.Linear(4, 4)}) for _ in range(n))
        self.head = nn.Linear(4, 2)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 5),
    names=st.lists(st.sampled_from(["up", "down", "head"]), min_size=1, max_size=3, unique=True),
    data=st.data(),
)
def test_resolution_properties(n, names, data):
    model = Blocks(n)
    layers = data.draw(st.none() | st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    if layers is not None and names == ["head"]:
        with pytest.raises(dt.TargetError):
            resolve_targets(model, names, layers=layers)
        return
    paths = resolve_targets(model, names, layers=layers)
    # every chosen path ends with one of the names, and every matching path in the kept layers is chosen
    expected = {
        p for p, _ in model.named_modules() if p and p.rsplit(".", 1)[-1] in names
        and (layers is None or (p.startswith("layers.") and int(p.split(".")[1]) in layers))
    }
    assert set(paths) == expected
    assert paths == sorted(paths)


@settings(max_examples=25, deadline=None)
@given(typo=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8))
def test_unknown_names_always_raise_target_error(typo):
    model = Blocks(2)
    real = {p.rsplit(".", 1)[-1] for p, _ in model.named_modules() if p} | {"0", "1"}
    if typo in real:
        return
    with pytest.raises(dt.TargetError, match=f"'{typo}' matched no module"):
        resolve_targets(model, [typo])


def test_wrapping_twice_resolves_through_hosts(llama):
    model = dt.wrap(llama, dt.LoraConfig(r=2, targets=["q_proj"]))
    model.add_adapter("b", dt.LoraConfig(r=2, targets=["q_proj", "k_proj"]))
    host = llama.model.layers[0].self_attn.q_proj
    assert set(host.adapters) == {"default", "b"}
    x = torch.randint(0, 128, (1, 4))
    with torch.no_grad():
        model(input_ids=x)
