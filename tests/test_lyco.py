"""LoHa and LoKr (methods/lyco): equal to HF PEFT both ways, the formulas by hand, exact merge, mixed batches,
training, CLI options, file round trip and clear refusals."""

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
from deltatune.methods.lyco import factorization, lokr_parameter_count

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
BERT_TARGETS = ["query", "value", "intermediate.dense"]
# (id, model, PEFT config class, ours, shared kwargs (PEFT names -> our names below))
CASES = [
    ("loha-llama", "llama", "loha", dict(r=4, alpha=6, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3})),
    ("loha-bert", "bert", "loha", dict(r=3, alpha=8)),
    ("lokr-llama-decompose-both", "llama", "lokr", dict(r=2, alpha=6, decompose_both=True)),
    ("lokr-llama-full-r64", "llama", "lokr", dict(r=64, alpha=16)),
    ("lokr-bert-factor4", "bert", "lokr", dict(r=1, alpha=3, decompose_factor=4, rank_pattern={"value": 8})),
]
PEFT_CONFIGS = {"loha": "LoHaConfig", "lokr": "LoKrConfig"}
OUR_CONFIGS = {"loha": dt.LoHaConfig, "lokr": dt.LoKrConfig}


def build(model: str) -> tuple[nn.Module, dict, list[str]]:
    if model == "llama":
        return tiny_llama(), dict(input_ids=torch.randint(0, 128, (2, 9))), LLAMA_TARGETS
    return tiny_bert_model(), dict(input_ids=torch.randint(0, 100, (2, 9))), BERT_TARGETS


def output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        result = model(**inputs)
    if isinstance(result, torch.Tensor):
        return result
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def assert_rel_close(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    error = (got - expected).abs().max().item()
    assert error <= tol * expected.abs().max().item(), error


def perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))


@pytest.mark.parametrize("model_name,method,kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_files_travel_both_ways_with_equal_outputs(tmp_path, model_name, method, kwargs):
    base, inputs, targets = build(model_name)
    pristine = copy.deepcopy(base)
    peft_config = getattr(peft, PEFT_CONFIGS[method])(target_modules=targets, init_weights=False, **kwargs)
    theirs = peft.get_peft_model(copy.deepcopy(pristine), peft_config).eval()
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = dt.load(copy.deepcopy(pristine), tmp_path / "theirs").eval()
    assert_rel_close(output(loaded, inputs), output(theirs, inputs))
    config = loaded.configs["default"]
    assert type(config) is OUR_CONFIGS[method] and config.init == "random"
    assert all(getattr(config, k) == v for k, v in kwargs.items())
    assert loaded.count_parameters()[0] == theirs.get_nb_trainable_parameters()[0]

    ours = dt.wrap(base, OUR_CONFIGS[method](targets=targets, init="random", **kwargs)).eval()
    perturb(ours)
    ours.save(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == method.upper()
    back = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "ours").eval()
    assert_rel_close(output(back, inputs), output(ours, inputs))
    with ours.disable_adapters():
        assert (output(ours, inputs) - output(back, inputs)).abs().max() > 1e-3  # the adapter is not an identity


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, groups=2, stride=2)
        self.d1 = nn.Conv1d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))
        y = self.d1(y.flatten(2))
        return self.fc(y.transpose(1, 2))


@pytest.mark.parametrize("method,kwargs", [("loha", dict(r=2)), ("lokr", dict(r=1)), ("lokr", dict(r=8))])
def test_convolutions_match_peft_both_ways_and_merge(tmp_path, method, kwargs):
    torch.manual_seed(0)
    base, inputs = Convs().eval(), dict(x=torch.randn(2, 4, 6, 6))
    targets = ["c1", "c2", "c3", "d1", "fc"]
    theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, PEFT_CONFIGS[method])(
        target_modules=targets, init_weights=False, alpha=3, **kwargs)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = dt.load(copy.deepcopy(base), tmp_path / "theirs").eval()
    assert_rel_close(output(loaded, inputs), output(theirs, inputs))
    ours = dt.wrap(copy.deepcopy(base), OUR_CONFIGS[method](targets=targets, init="random", alpha=3, **kwargs)).eval()
    ours.save(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    expected = output(ours, inputs)
    assert_rel_close(output(back, inputs), expected)
    ours.merge()
    assert_rel_close(output(ours, inputs), expected)


def one_layer(config: dt.LoHaConfig | dt.LoKrConfig) -> tuple[nn.Linear, DeltaLayer, dt.DeltaModel]:
    torch.manual_seed(0)
    model = dt.wrap(nn.Sequential(nn.Linear(12, 20)), config.replace(targets=["0"], init="random")).eval()
    host = model.model[0]
    return host.base_layer, host, model


def test_loha_forward_is_the_formula_by_hand():
    linear, host, model = one_layer(dt.LoHaConfig(r=3, alpha=5))
    d = host.adapters["default"]
    x = torch.randn(4, 12)
    dw = ((d.hada_w1_a @ d.hada_w1_b) * (d.hada_w2_a @ d.hada_w2_b)) * (5 / 3)
    expected = x @ linear.weight.T + linear.bias + x @ dw.T
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6, rtol=0)
        assert torch.allclose(d.delta_weight(host), dw, atol=1e-7, rtol=0)
    assert d.low_rank_factors() is None
    assert tuple(d.hada_w1_a.shape) == (20, 3) and tuple(d.hada_w2_b.shape) == (3, 12)


@pytest.mark.parametrize("r,names", [(1, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}), (3, {"lokr_w1", "lokr_w2"}),
                                     (1, {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"})])
def test_lokr_forward_is_the_kronecker_formula_by_hand(r, names):
    both = "lokr_w1_a" in names
    linear, host, model = one_layer(dt.LoKrConfig(r=r, alpha=2, decompose_both=both))
    d = host.adapters["default"]
    assert set(d.state_dict()) == names and d.low_rank_factors() is None
    (a, b), (c, e) = factorization(20), factorization(12)
    assert (a, b, c, e) == (4, 5, 3, 4)
    w1 = d.lokr_w1 if "lokr_w1" in names else d.lokr_w1_a @ d.lokr_w1_b
    w2 = d.lokr_w2 if "lokr_w2" in names else d.lokr_w2_a @ d.lokr_w2_b
    dw = torch.zeros(20, 12)
    for i in range(a):  # dW[i b + p, j d + q] = s w1[i, j] w2[p, q]
        for j in range(c):
            dw[i * b:(i + 1) * b, j * e:(j + 1) * e] = w1[i, j] * w2 * (2 / r)
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert torch.allclose(model(x), x @ linear.weight.T + linear.bias + x @ dw.T, atol=1e-6, rtol=0)
    n_params = sum(p.numel() for p in d.parameters())
    assert n_params == lokr_parameter_count(20, 12, r, both)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_merge_unmerge_and_unload_are_exact(method):
    base, inputs, targets = build("llama")
    model = dt.wrap(base, OUR_CONFIGS[method](r=2, alpha=4, targets=targets, init="random")).eval()
    weight = model.model.model.layers[0].self_attn.q_proj.weight
    original = weight.detach().clone()
    expected = output(model, inputs)
    model.merge()
    assert not torch.equal(weight, original)
    assert_rel_close(output(model, inputs), expected)
    model.unmerge()
    assert torch.allclose(weight, original, atol=1e-6, rtol=0)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, DeltaLayer) for m in plain.modules())
    assert_rel_close(output(plain, inputs), expected)


def test_mixed_adapter_batches_equal_single_runs():
    base, _, targets = build("llama")
    model = dt.wrap(base, dt.LoHaConfig(r=2, alpha=4, targets=targets, init="random"), "a").eval()
    model.add_adapter("b", dt.LoKrConfig(r=1, alpha=3, targets=targets, decompose_both=True, init="random"))
    model.add_adapter("c", dt.LoraConfig(r=2, targets=["q_proj"], init="random"))
    x = torch.randint(0, 128, (5, 7))
    assert_rows_match_single_runs(model, x, ["a", "__base__", "b", "c", "a"])


@pytest.mark.parametrize("method,kwargs", [("loha", {}), ("lokr", {"decompose_both": True, "r": 2})])
def test_training_reduces_the_loss_and_trains_only_the_delta(method, kwargs):
    base, inputs, targets = build("llama")
    theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, PEFT_CONFIGS[method])(target_modules=targets, **kwargs))
    model = dt.wrap(base, OUR_CONFIGS[method](targets=targets, **kwargs))
    assert model.count_parameters()[0] == theirs.get_nb_trainable_parameters()[0]
    assert "trainable: " in model.print_trainable()
    frozen = {n: p.detach().clone() for n, p in base.named_parameters() if not p.requires_grad}
    assert len(frozen) == len(list(tiny_llama().parameters()))  # every base tensor is frozen
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ids = inputs["input_ids"]
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad and all((".hada_" in n) or (".lokr_" in n) for n in with_grad), with_grad
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[n]) for n, p in base.named_parameters() if n in frozen)


def test_rank_and_module_dropout_follow_peft_in_training_only():
    linear, host, model = one_layer(dt.LoKrConfig(r=3, rank_dropout=0.5))
    d = host.adapters["default"]
    x = torch.randn(4, 12)
    with torch.no_grad():
        full_update = x @ d.delta_weight(host).T
        base_out = linear(x)
        assert torch.allclose(model(x) - base_out, full_update, atol=1e-6)  # eval: no dropout
        model.train()
        update = model(x) - base_out
        kept = update.abs().sum(0) > 0
        assert 0 < kept.sum() < 20  # whole output rows of dW are dropped (seeded), kept rows unscaled (no rescale)
        assert torch.allclose(update[:, kept], full_update[:, kept], atol=1e-6)
        loha_linear, loha_host, loha = one_layer(dt.LoHaConfig(r=3, module_dropout=0.999))
        loha.train()
        assert torch.equal(loha(x), loha_linear(x))  # the whole delta skipped
    assert d.dropout_p() == 0.5 and loha_host.adapters["default"].dropout_p() == 0.999


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_deltatune_round_trip_is_exact(tmp_path, method):
    base, inputs, targets = build("bert")
    pristine = copy.deepcopy(base)
    extra = {"decompose_factor": 4, "init": "lycoris"} if method == "lokr" else {}
    config = OUR_CONFIGS[method](r=3, alpha=5, targets=targets, rank_dropout=0.1, module_dropout=0.2, **extra)
    model = dt.wrap(base, config).eval()
    perturb(model)
    model.save(tmp_path)
    loaded = dt.load(pristine, tmp_path).eval()
    ours, theirs = dt.io.adapter_tensors(model, "default"), dt.io.adapter_tensors(loaded, "default")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert loaded.configs["default"].replace(base_model_name_or_path=None) == config.replace(base_model_name_or_path=None)
    assert torch.equal(output(loaded, inputs), output(model, inputs))


def test_unsupported_peft_settings_and_layers_are_refused_clearly(tmp_path):
    torch.manual_seed(0)
    base = Convs().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(target_modules=["c1"], r=2, use_effective_conv2d=True))
    theirs.save_pretrained(tmp_path / "cp")
    with pytest.raises(TargetError, match="use_effective_conv2d"):
        dt.load(copy.deepcopy(base), tmp_path / "cp")
    assert not any(isinstance(m, DeltaLayer) for m in base.modules())
    for bad in ({"init_weights": "pissa"}, {"decompose_factor": 0}, {"rank_dropout": 1.0}):
        data = {"peft_type": "LOKR", "r": 4, "target_modules": ["fc"], **bad}
        with pytest.raises(ConfigError, match=next(iter(bad)).replace("_weights", "")):
            dt.config_from_peft_dict(data)
    with pytest.raises(TargetError, match="Conv1D"):
        dt.wrap(tiny_gpt2(), dt.LoHaConfig(targets=["c_attn"]))
    with pytest.raises(ConfigError, match="trains no biases"):
        dt.LoKrConfig(bias="all")
    # a 1x1 convolution is unaffected by use_effective_conv2d, as in PEFT
    dt.wrap(copy.deepcopy(base), dt.LoKrConfig(targets=["c2"], use_effective_conv2d=True))


def test_cli_options_build_the_config_and_a_tiny_run_trains(tmp_path, tiny_model, capsys):
    from conftest import sst2_slice
    from deltatune.cli import main
    from deltatune.train.options import build_config

    config = build_config("lokr", {"r": "4", "alpha": "2", "decompose_both": "true", "decompose_factor": "8",
                                   "init": "lycoris", "rank_dropout_scale": "yes", "targets": "query,value"})
    assert config == dt.LoKrConfig(r=4, alpha=2, decompose_both=True, decompose_factor=8, init="lycoris",
                                   rank_dropout_scale=True, targets=["query", "value"])
    assert build_config("loha", {"module_dropout": "0.1", "rank_pattern": '{"query": 2}'}).rank_pattern == {"query": 2}
    data = sst2_slice(tmp_path / "data", {"train": 64, "dev": 32, "test": 32})
    for method in ("loha", "lokr"):
        common = ["--data", str(data), "--max-eval", "32", "--max-length", "32"]
        out = tmp_path / method
        assert main(["train", *common, "--model", tiny_model, "--method", method, "--r", "2", "--max-steps", "2",
                     "--out", str(out), "--quiet"]) == 0
        capsys.readouterr()
        assert main(["eval", *common, "--adapter", str(out), "--split", "test", "--json"]) == 0
        metrics = json.loads(capsys.readouterr().out)["test"]
        recorded = json.loads((out / "run.json").read_text())["results"]["test"]
        assert metrics["accuracy"] == recorded["accuracy"] and metrics["loss"] == pytest.approx(recorded["loss"], abs=1e-6)
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == method.upper()


@pytest.mark.parametrize("method,kwargs", [("loha", dict(r=2)), ("lokr", dict(r=1, decompose_both=True)), ("lokr", dict(r=8))])
def test_merge_checkpoint_equals_merge_and_unload(tmp_path, method, kwargs):
    for name, (base, targets) in {"llama": (tiny_llama(), LLAMA_TARGETS), "convs": (Convs(), ["c1", "c3", "d1"])}.items():
        model = dt.wrap(copy.deepcopy(base), OUR_CONFIGS[method](targets=targets, init="random", **kwargs))
        model.save(tmp_path / name)
        merged = dt.merge_checkpoint(base.state_dict(), tmp_path / name)
        expected = dt.load(copy.deepcopy(base), tmp_path / name).merge_and_unload().state_dict()
        assert merged.keys() == expected.keys()
        assert any(not torch.equal(merged[k], base.state_dict()[k]) for k in merged)
        for key in merged:
            torch.testing.assert_close(merged[key], expected[key], atol=1e-6, rtol=1e-6)
