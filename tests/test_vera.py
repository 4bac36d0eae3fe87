"""VeRA: PEFT files both ways (with and without saved projections), the formula on one layer, shared frozen
projections drawn as PEFT draws them, exact merge, mixed-adapter batches, training, CLI, round trip, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import assert_rows_match_single_runs, tiny_bert_model, tiny_gpt2, tiny_llama
from deltatune.layers import DeltaLayer

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT's save_projection / fan_in_fan_out notices

IDS = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(1))
CASES = {  # model, targets, extra PEFT options
    "llama": (tiny_llama, ["q_proj", "k_proj", "down_proj"], {}),  # q 32->32, k 32->16, down 64->32: slices differ
    "gpt2-conv1d": (tiny_gpt2, ["c_attn", "c_fc", "c_proj"], {"bias": "vera_only"}),
    "bert": (tiny_bert_model, ["query", "value", "dense"], {"vera_dropout": 0.1, "d_initial": 0.05}),
}


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def deltas(model: dt.DeltaModel, name: str = "default") -> list[tuple[DeltaLayer, nn.Module]]:
    return [(h, h.adapters[name]) for _, h in model.hosts() if isinstance(h, DeltaLayer) and name in h.adapters]


def perturbed_peft(case: str, save_projection: bool = True) -> nn.Module:
    make, targets, extra = CASES[case]
    config = peft.VeraConfig(r=6, target_modules=targets, projection_prng_key=7, save_projection=save_projection, **extra)
    model = peft.get_peft_model(make(), config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "vera_lambda" in name or (name.endswith("base_layer.bias") and extra.get("bias")):
                parameter.add_(torch.randn_like(parameter) * 0.5)
    return model


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_loads_with_equal_outputs(case, save_projection, tmp_path):
    reference = perturbed_peft(case, save_projection)
    reference.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = logits(reference)
    model = dt.load(CASES[case][0](), tmp_path).eval()  # deltas are built in training mode, as every method's
    assert relative(logits(model), expected) <= 1e-5
    with model.disable_adapters():
        assert relative(logits(model), expected) > 1e-3  # the adapter is not an identity
    # the shared pair is PEFT's, bit for bit, also when the file did not carry it (re-drawn from the key)
    _, delta = deltas(model)[0]
    assert torch.equal(delta.projections.vera_A, reference.base_model.vera_A["default"])
    assert torch.equal(delta.projections.vera_B, reference.base_model.vera_B["default"])


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_deltatune_file_loads_in_peft_with_equal_outputs(case, save_projection, tmp_path):
    make, targets, extra = CASES[case]
    bias = "lora_only" if extra.get("bias") else "none"
    config = dt.VeraConfig(r=6, targets=targets, projection_prng_key=3, save_projection=save_projection, init="random",
                           bias=bias, dropout=extra.get("vera_dropout", 0.0))
    model = dt.wrap(make(), config).eval()
    with torch.no_grad():
        for host, _ in deltas(model):
            if host.bias is not None and bias != "none":
                host.bias.add_(0.3)
    model.save(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "VERA" and written["save_projection"] is save_projection
    assert written["fan_in_fan_out"] is (case == "gpt2-conv1d") and written["bias"] == extra.get("bias", "none")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) is save_projection
    assert {k for k in keys if "vera_A" in k or "vera_B" in k} <= {"base_model.vera_A", "base_model.vera_B"}  # once
    reference = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    assert relative(logits(reference), logits(model)) <= 1e-5
    with model.disable_adapters():
        assert relative(logits(reference), logits(model)) > 1e-3


def test_defaults_and_trainable_count_equal_peft():
    ours, theirs = dt.VeraConfig().to_peft_dict(), peft.VeraConfig().to_dict()
    for key in ("r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "init_weights", "bias",
                "fan_in_fan_out", "target_modules", "layers_to_transform", "modules_to_save"):
        assert ours[key] == theirs[key], key
    for make in (tiny_llama, tiny_gpt2):
        model = dt.wrap(make(), dt.VeraConfig(r=5))  # default targets, as PEFT's
        trainable, _ = peft.get_peft_model(make(), peft.VeraConfig(r=5)).get_nb_trainable_parameters()
        assert model.count_parameters()[0] == trainable and trainable > 0
        assert f"trainable: {trainable:,} /" in model.print_trainable()


def test_forward_is_the_formula_and_projections_are_shared_and_frozen():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 12))
    model = dt.wrap(base, dt.VeraConfig(r=4, targets=["0", "2"], init="random", projection_prng_key=11))
    (first_host, first), (host, delta) = deltas(model)
    a, b = delta.projections.vera_A, delta.projections.vera_B
    assert a.shape == (4, 10) and b.shape == (12, 4)  # [r, in_max], [out_max, r]
    assert first.projections is delta.projections  # one pair for the adapter, not one per layer
    assert not a.requires_grad and not b.requires_grad
    assert all(p.data_ptr() not in (a.data_ptr(), b.data_ptr()) for p in model.parameters())
    generator = torch.Generator().manual_seed(11)  # kaiming uniform, gain sqrt 2, fan_in = columns; A drawn first
    expect_a = torch.empty(4, 10).uniform_(-(3 ** 0.5) * (2 / 10) ** 0.5, 3 ** 0.5 * (2 / 10) ** 0.5, generator=generator)
    assert torch.allclose(a, expect_a, atol=1e-7)
    x = torch.randn(5, 7)
    lam_b, lam_d = delta.vera_lambda_b.detach(), delta.vera_lambda_d.detach()
    by_hand = x @ base[2].weight.T + base[2].bias + lam_b * ((lam_d * (x @ a[:, :7].T)) @ b[:12, :].T)
    with torch.no_grad():
        assert torch.allclose(host(x), by_hand, atol=1e-6)
        dw = torch.diag(lam_b) @ b[:12] @ torch.diag(lam_d) @ a[:, :7]
        assert torch.allclose(delta.delta_weight(host), dw, atol=1e-6)
    # r may exceed the layer sizes (the paper's r = 1024 on 768-wide layers; LoRA would refuse it), within a bound
    assert deltas(dt.wrap(nn.Sequential(nn.Linear(6, 6)), dt.VeraConfig(r=64, targets=["0"])))[0][1].vera_lambda_d.numel() == 64
    small = nn.Sequential(nn.Linear(6, 6))
    with pytest.raises(dt.TargetError, match=r"use r <= 1024"):
        dt.wrap(small, dt.VeraConfig(r=10**6, targets=["0"]))  # refused before the 48 GB pair is drawn
    assert isinstance(small[0], nn.Linear) and all(p.requires_grad for p in small.parameters())


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_unmerge_and_merge_and_unload_are_exact(make):
    model = dt.wrap(make(), dt.VeraConfig(r=8, init="random"))
    with torch.no_grad():
        for _, delta in deltas(model):
            delta.vera_lambda_b.mul_(0.1)
    before = [host.weight.detach().clone() for host, _ in deltas(model)]
    unmerged = logits(model)
    model.merge()
    assert relative(logits(model), unmerged) <= 1e-5
    model.unmerge()
    assert all(torch.allclose(host.weight, w, atol=1e-6) for (host, _), w in zip(deltas(model), before))
    plain = model.merge_and_unload()
    assert not any(isinstance(m, DeltaLayer) for m in plain.modules())
    assert relative(logits(plain), unmerged) <= 1e-5


def test_mixed_adapter_batches_equal_single_adapter_runs():
    model = dt.wrap(tiny_llama(), dt.VeraConfig(r=6, init="random", projection_prng_key=1), "a")
    model.add_adapter("b", dt.VeraConfig(r=4, init="random", projection_prng_key=2, targets=["q_proj", "up_proj"]))
    model.add_adapter("c", dt.LoraConfig(r=2, init="random"))  # another method in the same batch
    assert_rows_match_single_runs(model, IDS.repeat(2, 1) % 128, ["a", "__base__", "b", "c", "b", "a"])


def test_training_moves_only_the_lambdas_and_lowers_the_loss():
    model = dt.wrap(tiny_llama(), dt.VeraConfig(r=16, targets="all-linear", dropout=0.1))
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    projections = deltas(model)[0][1].projections
    a_before = projections.vera_A.clone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("vera_lambda_b", "vera_lambda_d")) for n in trainable)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=0.05)
    ids = IDS % 128
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert torch.equal(projections.vera_A, a_before)


def test_cli_options_build_the_config():
    from deltatune.train.options import build_config

    config = build_config("vera", {"r": "32", "projection_prng_key": "9", "save_projection": "false", "d_initial": "0.2",
                                   "dropout": "0.1", "targets": "query,value", "init": "random", "bias": "vera_only"})
    assert config == dt.VeraConfig(r=32, projection_prng_key=9, save_projection=False, d_initial=0.2, dropout=0.1,
                                   targets=["query", "value"], init="random", bias="lora_only")
    with pytest.raises(dt.ConfigError, match="--r 'x' is not valid for method 'vera'"):
        build_config("vera", {"r": "x"})


def test_cli_trains_a_vera_adapter(tmp_path, tiny_model):
    from conftest import sst2_slice
    from deltatune.cli import main

    data = sst2_slice(tmp_path / "data", {"train": 32, "dev": 16, "test": 16})
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--model", tiny_model, "--method", "vera", "--r", "16",
                 "--targets", "query,value", "--projection-prng-key", "4", "--d-initial", "0.2", "--max-steps", "2",
                 "--batch-size", "8", "--max-length", "32", "--out", str(out), "--quiet"]) == 0
    written = json.loads((out / "adapter_config.json").read_text())
    assert (written["peft_type"], written["r"], written["projection_prng_key"], written["d_initial"]) == ("VERA", 16, 4, 0.2)


def test_round_trip_is_exact_and_bad_files_are_refused(tmp_path):
    model = dt.wrap(tiny_gpt2(), dt.VeraConfig(r=6, init="random", projection_prng_key=2**40))  # a seed, not a size
    model.save(tmp_path / "a")
    loaded = dt.load(tiny_gpt2(), tmp_path / "a")
    ours, theirs = (dict(m.named_parameters()) | dict(m.named_buffers()) for m in (model, loaded))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(logits(model), logits(loaded))
    config_path = tmp_path / "a" / "adapter_config.json"
    data = json.loads(config_path.read_text())
    for change, message in (({"vera_dropout": 1.5}, "dropout must be < 1"), ({"r": 0}, "r must be a positive"),
                            ({"bias": "lots"}, "bias must be"), ({"projection_prng_key": 2**70}, "64-bit")):
        config_path.write_text(json.dumps(data | change))
        with pytest.raises(dt.ConfigError, match=message):
            dt.load(tiny_gpt2(), tmp_path / "a")
    config_path.write_text(json.dumps(data | {"some_future_key": 1}))  # unknown keys: a warning, never a crash
    with pytest.warns(UserWarning, match="some_future_key"):
        dt.load(tiny_gpt2(), tmp_path / "a")
    # a config that promises saved projections while the weights lack them: refused, nothing left on the model
    dt.wrap(tiny_gpt2(), dt.VeraConfig(r=6, save_projection=False, projection_prng_key=3)).save(tmp_path / "b")
    config_path = tmp_path / "b" / "adapter_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"save_projection": True}))
    base = tiny_gpt2()
    with pytest.raises(dt.AdapterFileError, match="missing tensors.*base_model.vera_A"):
        dt.load(base, tmp_path / "b")
    assert not any(isinstance(m, DeltaLayer) for m in base.modules())
