"""Loading builds adapters without a fake init (issue 22): ``add_adapter(init=False)`` leaves every file tensor on the
meta device, no initialiser runs on real memory, the file's tensors are filled in, derived tensors (MoRA's rotation
tables, VeRA projections drawn from the seed) are computed as usual, and a failed load leaves the model exactly as
it was."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

import deltatune as dt
import deltatune.io as dt_io
from conftest import tiny_gpt2, tiny_llama
from deltatune.errors import AdapterFileError, ConfigError, DeltatuneError
from deltatune.filling import empty_copy, fill, place, unfilled
from deltatune.methods import asylora, lora
from deltatune.methods.dora import DoraLinear
from deltatune.methods.lyco import layer as lyco_layer
from deltatune.methods.prompt import PromptTuningConfig
from deltatune.methods.vera import layer as vera_layer
from deltatune.protocol import initialising, no_init

IDS = torch.tensor([[3, 17, 42, 5, 99, 7], [1, 2, 3, 4, 5, 6]])
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (config, base); every init is a random one, so a load that kept any initial value would differ
CASES: dict[str, tuple[Callable[[], dt.DeltaConfig], Callable[[], nn.Module]]] = {
    "lora": (lambda: dt.LoraConfig(r=4, alpha=8, targets=LINEARS, init="random"), tiny_llama),
    "lora-embedding-head-bias": (lambda: dt.LoraConfig(
        r=4, targets=["q_proj", "embed_tokens"], init="random", bias="all", modules_to_save=["lm_head"]), tiny_llama),
    "lora-gpt2-conv1d-bias": (lambda: dt.LoraConfig(r=4, targets=["c_attn", "c_proj"], init="random", bias="all"),
                              tiny_gpt2),
    "dora": (lambda: dt.DoraConfig(r=4, targets=LINEARS, init="random"), tiny_llama),
    "asylora": (lambda: dt.AsyLoraConfig(r=4, targets=LINEARS, init="random"), tiny_llama),
    "mora-rope": (lambda: dt.MoraConfig(r=4, targets=LINEARS, init="random"), tiny_llama),
    "mora-type1": (lambda: dt.MoraConfig(r=4, mora_type=1, targets=LINEARS, init="random"), tiny_llama),
    "vera": (lambda: dt.VeraConfig(r=16, targets=LINEARS, init="random"), tiny_llama),
    "vera-seed-only": (lambda: dt.VeraConfig(r=16, targets=LINEARS, init="random", save_projection=False), tiny_llama),
    "ia3": (lambda: dt.IA3Config(init_weights=False), tiny_llama),
    "loha": (lambda: dt.LoHaConfig(r=4, targets=LINEARS, init="random"), tiny_llama),
    "lokr": (lambda: dt.LoKrConfig(r=4, targets=LINEARS, init="random", decompose_both=True), tiny_llama),
    "oft": (lambda: dt.OFTConfig(oft_block_size=8, targets=LINEARS, init="random"), tiny_llama),
    "prompt": (lambda: dt.PromptTuningConfig(num_virtual_tokens=4), tiny_llama),
    "ptuning": (lambda: dt.PTuningConfig(num_virtual_tokens=4), tiny_llama),
    "prefix": (lambda: dt.PrefixTuningConfig(num_virtual_tokens=4), tiny_llama),
    "adapter": (lambda: dt.HoulsbyConfig(bottleneck=8, init="random", train_layernorms=True), tiny_llama),
}
# derived tensors a load computes on real memory, by case: VeRA's projections re-drawn from the seed
REAL_INITS = {"vera-seed-only": 2}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def saved(case: str, folder) -> tuple[dt.DeltaModel, torch.Tensor]:
    make_config, make_base = CASES[case]
    model = dt.wrap(make_base(), make_config()).eval()
    with torch.no_grad():  # trained-looking values everywhere (heads, norms, biases too): a missed tensor shows
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save(folder)
    return model, logits(model)


class InitSpy(TorchFunctionMode):
    """Inside ``with spy:``, records every initialiser or filled factory that produces a real (non-meta) tensor, and
    makes each method's own init function raise. A torch function mode sees tensor methods and factories alike; the
    meta device of ``no_init`` is an inner mode, so calls it redirects reach this one already meta."""

    NAMES = {"normal_", "uniform_", "zero_", "fill_", "bernoulli_", "exponential_", "randn", "rand", "randint",
             "ones", "zeros", "full", "randn_like", "rand_like", "ones_like", "zeros_like", "full_like"}

    def __init__(self, monkeypatch: pytest.MonkeyPatch, vera_projections_saved: bool = True) -> None:
        super().__init__()
        self.real: list[str] = []
        for owner, name in [(lora, "init_pair"), (asylora, "orthonormal_rows"), (DoraLinear, "full_norm"),
                            (lyco_layer, "_kaiming"), (PromptTuningConfig, "initialise")]:
            monkeypatch.setattr(owner, name, self._refusing(f"{getattr(owner, '__name__', owner)}.{name}"))
        if vera_projections_saved:
            monkeypatch.setattr(vera_layer, "kaiming_uniform", self._refusing("vera kaiming_uniform"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in self.NAMES and isinstance(result, torch.Tensor) and not result.is_meta:
            self.real.append(f"{name}{tuple(result.shape)}")
        return result

    @staticmethod
    def _refusing(name: str) -> Callable:
        def refuse(*args, **kwargs):
            raise AssertionError(f"{name} ran while loading")
        return refuse


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_method_loads_bit_identically_without_running_its_init(case, tmp_path, monkeypatch):
    model, expected = saved(case, tmp_path)
    base = CASES[case][1]()
    spy = InitSpy(monkeypatch, vera_projections_saved=case != "vera-seed-only")
    with spy:
        loaded = dt.load(base, tmp_path).eval()
    monkeypatch.undo()
    assert len(spy.real) == REAL_INITS.get(case, 0), spy.real
    assert torch.equal(logits(loaded), expected)
    assert not [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.is_meta]
    file_config = dt_io.read_config(tmp_path)  # the saved config, as written (task type and fan_in_fan_out filled)
    assert loaded.configs["default"] == file_config and type(loaded.configs["default"]) is type(file_config)
    assert dt_io.config_dict(loaded, "default") == json.loads((tmp_path / "adapter_config.json").read_text())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}  # the loaded form may lack an encoder
    assert {n: p.requires_grad for n, p in loaded.named_parameters()}.items() <= flags.items()


def test_derived_buffers_are_computed_not_loaded(tmp_path):
    """MoRA's rotation tables and VeRA's seed-drawn projections are in no file: they are built as on a fresh init."""
    for case in ("mora-rope", "vera-seed-only"):
        _, _ = saved(case, tmp_path / case)
        fresh = dt.wrap(tiny_llama(), CASES[case][0]())
        loaded = dt.load(tiny_llama(), tmp_path / case)
        ours = {n: b for n, b in loaded.named_buffers() if "rope" in n or "vera_" in n}
        assert ours and all(torch.equal(b, dict(fresh.named_buffers())[n]) for n, b in ours.items())


def test_add_adapter_without_init_leaves_file_tensors_on_meta_and_keeps_the_config():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, targets=["q_proj"]))
    config = dt.MoraConfig(r=4, targets=["v_proj"], base_model_name_or_path="tiny", modules_to_save=["lm_head"])
    model.add_adapter("m", config, init=False)
    assert model.configs["m"] is config
    holders = [(p, h.adapter_module("m")) for p, h in model.hosts() if h.adapter_module("m") is not None]
    left = unfilled(holders)
    assert left and all(n.endswith(("mora_M.weight", "lm_head.weight")) for n in left)
    assert all(not b.is_meta for _, m in holders for b in m.buffers())  # the rope tables, computed
    assert model.active_adapters == ["default"] and initialising()


def test_principal_inits_cannot_be_built_empty_and_leave_the_model_as_it_was():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, targets=["q_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="cannot be built empty"):
        model.add_adapter("p", dt.LoraConfig(r=2, targets=["k_proj"], init="pissa"), init=False)
    assert list(model.configs) == ["default"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and model.state_dict().keys() == before.keys()


def snapshot(model: nn.Module) -> tuple[dict, dict, list]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = [(n, type(m).__name__) for n, m in model.named_modules()]
    return state, flags, modules


def assert_unchanged(model: nn.Module, before: tuple[dict, dict, list]) -> None:
    state, flags, modules = snapshot(model)
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)
    assert flags == before[1]
    assert modules == before[2]
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


def truncate(folder) -> None:
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_one_tensor(folder) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors.pop(sorted(tensors)[-1])
    save_file(tensors, path)


def reshape_one_tensor(folder) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    save_file(tensors, path)


@pytest.mark.parametrize("damage, error", [(truncate, "not a readable safetensors"), (drop_one_tensor, "missing"),
                                           (reshape_one_tensor, "shape mismatch")])
@pytest.mark.parametrize("onto", ["plain", "wrapped"])
def test_failed_loads_leave_the_model_exactly_as_it_was(tmp_path, damage, error, onto):
    saved("lora-embedding-head-bias", tmp_path)
    damage(tmp_path)
    base = tiny_llama()
    if onto == "wrapped":
        base = dt.wrap(base, dt.IA3Config())
    before = snapshot(base)
    with pytest.raises(AdapterFileError, match=error):
        dt.load(base, tmp_path, name="new")
    assert_unchanged(base, before)
    if onto == "wrapped":
        assert list(base.configs) == ["default"]


def test_a_failure_after_tensors_were_filled_rolls_back_too(tmp_path, monkeypatch):
    """The last step fails (after the adapter's own tensors and the base biases were filled): all is undone."""
    saved("lora-gpt2-conv1d-bias", tmp_path)
    base = dt.wrap(tiny_gpt2(), dt.LoraConfig(r=2, targets=["c_attn"]))
    before = snapshot(base)
    monkeypatch.setattr(dt_io, "unfilled", lambda holders: ["transformer.h.0.attn.c_attn.made_up"])
    with pytest.raises(DeltatuneError, match="made_up"):
        dt.load(base, tmp_path, name="new")
    assert_unchanged(base, before)
    assert list(base.configs) == ["default"]


def test_a_tensor_no_one_fills_is_an_error_naming_it(tmp_path, monkeypatch):
    """A method that builds a computed buffer on the meta device by mistake makes the load fail, naming the tensor."""
    from deltatune.methods.mora import MoraLinear

    saved("mora-type1", tmp_path)
    original = MoraLinear.__init__

    def forgetful(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.register_buffer("table", torch.ones(3), persistent=False)  # no device: meta inside no_init

    monkeypatch.setattr(MoraLinear, "__init__", forgetful)
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(DeltatuneError, match=r"q_proj\.table"):
        dt.load(base, tmp_path)
    assert_unchanged(base, before)


def test_loads_onto_a_quantized_base_are_exact(tmp_path):
    model = dt.wrap(dt.quantize_nf4(tiny_llama(), compute_dtype=torch.float32),
                    dt.DoraConfig(r=4, targets=["q_proj", "v_proj"], init="random")).eval()
    model.save(tmp_path)
    loaded = dt.load(dt.quantize_nf4(tiny_llama(), compute_dtype=torch.float32), tmp_path).eval()
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("make", [
    lambda: dt.LoraConfig(init="zeros"), lambda: dt.DoraConfig(init="zeros"), lambda: dt.AsyLoraConfig(init="zeros"),
    lambda: dt.VeraConfig(init="zeros"), lambda: dt.LoHaConfig(init="zeros"), lambda: dt.LoKrConfig(init="zeros"),
    lambda: dt.AdapterConfig(init="zeros"), lambda: dt.PromptTuningConfig(init="zeros"),
])
def test_the_loading_only_zeros_init_left_the_public_choices(make):
    with pytest.raises(ConfigError, match="init"):
        make()


def test_zeros_stays_where_it_is_a_real_init():
    """OFT's and MoRA's "zeros" is PEFT's init_weights=True (R = I, M = 0); prefix tuning's is PEFT's "zero"."""
    assert dt.OFTConfig().init == "zeros" and dt.MoraConfig().init == "zeros"
    assert dt.PrefixTuningConfig(init="zeros").to_peft_dict()["init_weights"] == "zero"


def test_combined_adapters_are_plain_kaiming_lora_in_files(tmp_path):
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, targets=["q_proj"], init="random"))
    model.add_adapter("b", dt.LoraConfig(r=2, targets=["q_proj"], init="random"))
    model.add_weighted_adapter(["default", "b"], [1.0, 0.5], "ab", combination_type="cat")
    model.save(tmp_path, adapter="ab")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] is True


# ---- the filling primitives ---------------------------------------------------------------------------------------
def test_fill_keeps_the_objects_and_uses_matching_values_without_a_copy():
    with no_init():
        module = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2, bias=False))
    weight = module[0].weight
    weight._deltatune_frozen = True
    weight.requires_grad_(False)
    place(module, "cpu", torch.float64)
    assert weight.is_meta and weight.dtype == torch.float64
    values = {id(t): torch.randn(t.shape, dtype=torch.float64) for t in module.parameters()}
    shared = torch.randn(4, dtype=torch.float64)
    values[id(module[0].bias)] = shared[:2]  # a view of a larger storage: copied
    own = values[id(weight)]
    fill([module], values)
    assert module[0].weight is weight and weight._deltatune_frozen and not weight.requires_grad
    assert weight.data_ptr() == own.data_ptr()  # no copy
    assert module[0].bias.data_ptr() != shared.data_ptr() and torch.equal(module[0].bias, shared[:2])
    assert unfilled([("m", module)]) == []


def test_fill_converts_dtype_and_never_lets_two_tensors_share_memory():
    with no_init():
        module = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    one = torch.ones(2, 2)
    fill([module[0], module[1]], {id(module[0].weight): one, id(module[1].weight): one})
    assert module[0].weight.data_ptr() == one.data_ptr() != module[1].weight.data_ptr()
    assert torch.equal(module[1].weight, one) and unfilled([("", module)]) == ["2.weight"]
    fill([module], {id(module[2].weight): torch.ones(2, 2, dtype=torch.float64)})
    assert module[2].weight.dtype == torch.float32 and torch.equal(module[2].weight, one)


def test_empty_copy_leaves_state_dict_tensors_on_meta_and_copies_the_rest():
    base = nn.BatchNorm1d(4)
    base.register_buffer("table", torch.arange(4.0), persistent=False)
    replica = empty_copy(base, torch.device("cpu"))
    assert all(t.is_meta for t in replica.state_dict().values())
    assert not replica.table.is_meta and torch.equal(replica.table, base.table)
    assert not any(t.is_meta for t in base.state_dict().values())
    assert math.isclose(base.momentum, replica.momentum)
