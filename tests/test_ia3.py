"""IA3: PEFT files both ways, the formula by hand, exact merge/unmerge (biases included), mixed batches, training,
the CLI, round trips and refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import assert_rows_match_single_runs, tiny_bert_model, tiny_gpt2, tiny_llama
from deltatune.errors import ConfigError, TargetError
from deltatune.layers import DeltaLayer

peft = pytest.importorskip("peft")

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert_model}
IDS = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(7))


def output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        result = model(input_ids=IDS)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def perturb(model: nn.Module, seed: int = 0) -> int:
    """Set every ``ia3_l`` to 1 + 0.3 N(0, 1) (seeded, in parameter order); returns how many vectors there are."""
    generator = torch.Generator().manual_seed(seed)
    vectors = [p for n, p in model.named_parameters() if "ia3_l" in n]
    with torch.no_grad():
        for p in vectors:
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator))
    return len(vectors)


def random_biases(model: nn.Module) -> nn.Module:
    """transformers initialises biases to zero; make them non-zero so the bias rules are really tested."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    return model


def ia3_deltas(model: dt.DeltaModel, name: str = "default") -> dict[str, nn.Module]:
    return {p: h.adapters[name] for p, h in model.hosts() if isinstance(h, DeltaLayer) and name in h.adapters}


# ---- 1. PEFT files both ways ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_peft_file_loads_into_deltatune_with_equal_outputs(arch, tmp_path):
    base = random_biases(BUILDERS[arch]())
    fresh = copy.deepcopy(base)
    reference = peft.get_peft_model(base, peft.IA3Config())  # PEFT's architecture defaults
    assert perturb(reference) > 0
    reference.save_pretrained(tmp_path)
    expected = output(reference)
    model = dt.load(fresh, tmp_path)
    assert rel(output(model), expected) <= 1e-5
    config = model.configs["default"]
    assert isinstance(config, dt.IA3Config) and set(config.feedforward) == set(reference.peft_config["default"].feedforward_modules)
    # the same layers are scaled on the same side, with PEFT's vector shapes
    peft_vectors = {n.replace(".default", ""): p for n, p in reference.named_parameters() if "ia3_l" in n}
    ours = {f"base_model.model.{path}.ia3_l": d.ia3_l for path, d in ia3_deltas(model).items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in peft_vectors.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_deltatune_file_loads_into_peft_with_equal_outputs(arch, tmp_path):
    base = random_biases(BUILDERS[arch]())
    fresh = copy.deepcopy(base)
    model = dt.wrap(base, dt.IA3Config())
    perturb(model, seed=1)
    model.save(tmp_path)
    expected = output(model)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3" and saved["fan_in_fan_out"] == (arch == "gpt2")
    reference = peft.PeftModel.from_pretrained(fresh, tmp_path)
    assert rel(output(reference), expected) <= 1e-5
    peft_config = reference.peft_config["default"]
    assert set(peft_config.target_modules) == set(model.configs["default"].targets)
    assert peft_config.init_ia3_weights is True


@pytest.mark.parametrize(("targets", "feedforward"), [
    (["k_proj", "mlp.down_proj"], None),  # the default ["down_proj"] is no subset: written as an exact-path regex
    (["k_proj", "v_proj"], None),  # no feedforward layer targeted: written as []
    (["v_proj", "down_proj", "up_proj"], ["down_proj", "up_proj"]),
    (".*layers\\.1\\..*(k_proj|down_proj)", ".*down_proj"),
])
def test_feedforward_choices_mean_the_same_in_peft(targets, feedforward, tmp_path):
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    model = dt.wrap(base, dt.IA3Config(targets=targets, feedforward=feedforward))
    perturb(model, seed=2)
    sides = {p: d.transforms_input for p, d in ia3_deltas(model).items()}
    model.save(tmp_path)
    reference = peft.PeftModel.from_pretrained(fresh, tmp_path)
    peft_sides = {n: m.is_feedforward for n, m in reference.base_model.model.named_modules() if hasattr(m, "is_feedforward")}
    assert peft_sides == sides
    assert rel(output(reference), output(model)) <= 1e-5


def test_init_weights_false_is_random_and_round_trips_through_peft(tmp_path):
    model = dt.wrap(tiny_llama(), dt.IA3Config(init_weights=False))
    assert all((d.ia3_l - 1).abs().max() > 0.1 for d in ia3_deltas(model).values())
    model.save(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_ia3_weights"] is False
    reference = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert rel(output(reference), output(model)) <= 1e-5
    assert dt.load(tiny_llama(), tmp_path).configs["default"].init_weights is False


def test_conv2d_matches_peft_both_ways(tmp_path):
    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3, groups=2), nn.ReLU(), nn.Conv2d(6, 5, 1))

    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(3))
    reference = peft.get_peft_model(net(), peft.IA3Config(target_modules=["0", "2", "4"], feedforward_modules=["2"]))
    perturb(reference)
    reference.save_pretrained(tmp_path / "peft")
    model = dt.load(net(), tmp_path / "peft")
    with torch.no_grad():
        assert rel(model(x), reference(x)) <= 1e-5
        model.save(tmp_path / "ours")
        back = peft.PeftModel.from_pretrained(net(), tmp_path / "ours")
        assert rel(back(x), model(x)) <= 1e-5
        expected = model(x)
        model.merge()  # grouped conv, input side: l repeated per group
        assert rel(model(x), expected) <= 1e-5
        model.unmerge()
        assert torch.equal(model(x), expected) or rel(model(x), expected) <= 1e-6


# ---- 2. the formula by hand ----------------------------------------------------------------------------------------
def test_forward_is_the_formula_on_one_layer():
    model = dt.wrap(random_biases(tiny_bert_model()), dt.IA3Config())
    perturb(model, seed=3)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    layer = model.model.encoder.layer[0]
    key, down = layer.attention.self.key, layer.output.dense  # key: output side; FFN output.dense: input side
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(5))
    l_key, l_down = key.adapters["default"].ia3_l, down.adapters["default"].ia3_l
    assert l_key.shape == (32, 1) and l_down.shape == (1, 64)
    with torch.no_grad():
        by_hand_key = l_key.flatten() * (x @ key.weight.T + key.bias)  # y = l * (W x + b)
        by_hand_down = (l_down.flatten() * h) @ down.weight.T + down.bias  # y = W (l * x) + b
        assert (key(x) - by_hand_key).abs().max() <= 1e-6
        assert (down(h) - by_hand_down).abs().max() <= 1e-6


# ---- 3. merge / unmerge --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_merge_matches_peft_and_unmerge_restores_weights_and_biases(arch):
    base = random_biases(BUILDERS[arch]())
    original = {k: v.clone() for k, v in base.state_dict().items()}
    reference = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config())
    perturb(reference)
    model = dt.wrap(base, dt.IA3Config())
    perturb(model)
    expected = output(model)
    assert rel(expected, output(reference)) <= 1e-5
    model.merge()
    assert rel(output(model), expected) <= 1e-5
    merged = {k: v.clone() for k, v in model.model.state_dict().items() if ".adapters." not in k}
    peft_merged = reference.merge_and_unload().state_dict()
    assert merged.keys() == peft_merged.keys()
    assert max(rel(merged[k], peft_merged[k]) for k in merged) <= 1e-6  # weights and scaled biases as PEFT
    assert any(not torch.equal(merged[k], original[k]) for k in merged if k.endswith("bias"))
    model.unmerge()
    assert rel(output(model), expected) <= 1e-6
    restored = {k: v for k, v in model.model.state_dict().items() if ".adapters." not in k}
    assert restored.keys() == original.keys() and max(rel(restored[k], original[k]) for k in original) <= 1e-6
    plain = model.merge_and_unload()
    assert not any(isinstance(m, DeltaLayer) for m in plain.modules())
    assert rel(output(plain), expected) <= 1e-5


def test_unmerge_restores_entries_whose_scale_is_zero():
    base = random_biases(tiny_bert_model())
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = dt.wrap(base, dt.IA3Config())
    for delta in ia3_deltas(model).values():
        with torch.no_grad():
            delta.ia3_l.view(-1)[::3] = 0.0
    expected = output(model)
    model.merge()
    assert rel(output(model), expected) <= 1e-5
    model.unmerge()
    restored = {k: v for k, v in model.model.state_dict().items() if ".adapters." not in k}
    assert restored.keys() == original.keys()
    assert all(torch.allclose(v, original[k], rtol=1e-6, atol=1e-7) for k, v in restored.items())


# ---- 4. mixed-adapter batches --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_rows_equal_single_adapter_runs(arch):
    model = dt.wrap(BUILDERS[arch](), dt.IA3Config(), "a")
    model.add_adapter("b", dt.IA3Config(targets=["c_attn"] if arch == "gpt2" else ["k_proj", "down_proj"]))
    perturb(model, seed=4)
    ids = torch.randint(0, 100, (5, 7), generator=torch.Generator().manual_seed(8))
    assert_rows_match_single_runs(model, ids, ["a", "__base__", "b", "a", "b"])


# ---- 5. training ---------------------------------------------------------------------------------------------------
def test_training_moves_only_the_vectors_and_counts_like_peft():
    base = tiny_llama()
    peft_count = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config()).get_nb_trainable_parameters()[0]
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = dt.wrap(base, dt.IA3Config())
    assert model.count_parameters()[0] == peft_count == 2 * (16 + 16 + 64)  # k_proj, v_proj out 16; down_proj in 64
    assert f"trainable: {peft_count:,} /" in model.print_trainable()
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=0.05)
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(9))
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        assert all((p.grad is not None) == ("ia3_l" in n) for n, p in model.named_parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01
    assert all(torch.equal(v, frozen[k]) for k, v in model.model.state_dict().items() if "ia3_l" not in k)


# ---- 6. CLI --------------------------------------------------------------------------------------------------------
def test_cli_options_build_the_config():
    from deltatune.train.options import build_config

    config = build_config("ia3", {"targets": "key,value,output.dense", "feedforward": "output.dense", "init_weights": "false"})
    assert config == dt.IA3Config(targets=["key", "value", "output.dense"], feedforward=["output.dense"], init_weights=False)
    with pytest.raises(ConfigError, match="subset of targets"):
        build_config("ia3", {"targets": "key,value", "feedforward": "output.dense"})


def test_cli_trains_ia3(tmp_path, tiny_model):
    from conftest import sst2_slice
    from deltatune.cli import main

    data = sst2_slice(tmp_path / "data", {"train": 32, "dev": 16, "test": 16})
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--model", tiny_model, "--method", "ia3", "--targets",
                 "key,value,output.dense", "--feedforward", "output.dense", "--max-steps", "2", "--batch-size", "8",
                 "--max-length", "32", "--out", str(out), "--quiet"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3" and saved["feedforward_modules"] == ["output.dense"]


# ---- 7. round trip and refusals ------------------------------------------------------------------------------------
def test_round_trip_is_exact(tmp_path):
    model = dt.wrap(tiny_gpt2(), dt.IA3Config())
    perturb(model, seed=5)
    model.save(tmp_path)
    loaded = dt.load(tiny_gpt2(), tmp_path)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(output(loaded), output(model))


def test_refusals(tmp_path):
    model = dt.wrap(tiny_llama(), dt.IA3Config())
    model.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "layers_to_transform": [0]}))
    with pytest.raises(ConfigError, match="layers_to_transform"):
        dt.load(tiny_llama(), tmp_path)
    with pytest.raises(ConfigError, match="subset of targets"):
        dt.IA3Config(targets=["k_proj"], feedforward=["down_proj"])
    with pytest.raises(ConfigError, match="bias"):
        dt.IA3Config(bias="all")
    with pytest.raises(ConfigError, match="layers"):
        dt.IA3Config(layers=[0])
    with pytest.raises(TargetError, match="feedforward"):
        dt.wrap(nn.Sequential(nn.Linear(4, 4)), dt.IA3Config(targets=["0"]))  # unknown architecture: say which side
    plain = dt.wrap(nn.Sequential(nn.Linear(4, 4)), dt.IA3Config(targets=["0"], feedforward=[]))
    assert plain.count_parameters()[0] == 4
