"""OFT: PEFT 0.21 files both ways with equal logits (every parametrisation flag), the rotation written out by hand,
exact merge/unmerge, mixed-adapter batches, training, the CLI, round trips and refused configs."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from conftest import MLP, assert_rows_match_single_runs, tiny_bert_model, tiny_gpt2, tiny_llama
from deltatune.errors import ConfigError, TargetError
from deltatune.layers import DeltaLayer

peft = pytest.importorskip("peft")

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.tensor([[3, 17, 42, 5, 99, 64, 8, 23], [7, 7, 120, 1, 0, 55, 31, 12]])
VARIANTS = {  # name -> OFTConfig / peft.OFTConfig keyword arguments (same names in both)
    "neumann-block8": {"oft_block_size": 8},
    "exact-cayley-r4": {"r": 4, "oft_block_size": 0, "use_cayley_neumann": False},
    "block-share": {"oft_block_size": 16, "block_share": True},
    "coft": {"oft_block_size": 8, "coft": True, "eps": 0.5},
    "neumann-3-terms": {"oft_block_size": 8, "num_cayley_neumann_terms": 3},
}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb_peft(model, seed: int = 3, std: float = 0.2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "oft_R" in name:
                parameter.copy_(std * torch.randn(parameter.shape, generator=generator))


def ours(base, init: str = "random", targets=None, **kwargs):
    return dt.wrap(base, dt.OFTConfig(targets=targets or LLAMA_TARGETS, init=init, **kwargs))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peft_file_loads_with_equal_logits_and_merged_weights(tmp_path, variant):
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(target_modules=LLAMA_TARGETS, **VARIANTS[variant]))
    perturb_peft(theirs)
    theirs.save_pretrained(tmp_path)
    loaded = dt.load(copy.deepcopy(base), tmp_path)
    config = loaded.configs["default"]
    assert isinstance(config, dt.OFTConfig) and {k: getattr(config, k) for k in VARIANTS[variant]} == VARIANTS[variant]
    expected = logits(theirs)
    assert relative(logits(base), expected) > 1e-2  # the adapter is far from the identity
    assert relative(logits(loaded), expected) <= 1e-5
    peft_merged = theirs.merge_and_unload()
    plain = loaded.merge_and_unload()
    for name, weight in peft_merged.state_dict().items():
        assert torch.allclose(plain.state_dict()[name], weight, rtol=1e-5, atol=1e-6), name
    assert relative(logits(plain), expected) <= 1e-5


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_deltatune_file_loads_in_peft_with_equal_logits(tmp_path, variant):
    base = tiny_llama()
    model = ours(copy.deepcopy(base), **VARIANTS[variant])
    expected = logits(model)
    model.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "OFT" and data["init_weights"] is False and data["fan_in_fan_out"] is False
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert relative(logits(base), expected) > 1e-2
    assert relative(logits(theirs), expected) <= 1e-5


def test_bert_both_ways_with_default_targets(tmp_path):
    """BERT, targets from the architecture default (query, value, as PEFT's OFT mapping), PEFT's default block size
    32 on a 32-wide model, bias 'oft_only' (biases of the adapted layers train and are saved)."""
    base = tiny_bert_model()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(bias="oft_only"))
    perturb_peft(theirs)
    with torch.no_grad():
        theirs.base_model.model.encoder.layer[0].attention.self.query.base_layer.bias.add_(0.5)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = dt.load(tiny_bert_model(), tmp_path / "peft")
    assert loaded.configs["default"].bias == "lora_only" and sorted(loaded.configs["default"].targets) == ["query", "value"]
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(input_ids=ids).last_hidden_state
        assert relative(loaded(input_ids=ids).last_hidden_state, expected) <= 1e-5
    loaded.save(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["bias"] == "oft_only"
    again = peft.PeftModel.from_pretrained(tiny_bert_model(), tmp_path / "ours")
    with torch.no_grad():
        assert relative(again(input_ids=ids).last_hidden_state, expected) <= 1e-5


def hand_rotation(packed: torch.Tensor, size: int, neumann: bool) -> torch.Tensor:
    """R from one packed row: Q skew with the row as its strict upper triangle (row-major)."""
    q = torch.zeros(size, size, dtype=torch.float64)
    q[torch.triu_indices(size, size, 1).unbind()] = packed.double()
    q = q - q.T
    eye = torch.eye(size, dtype=torch.float64)
    if neumann:  # 5 terms: I + 2Q + 2Q^2 + 2Q^3 + Q^4
        return eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q
    return (eye - q) @ torch.linalg.inv(eye + q)


@pytest.mark.parametrize("neumann", [True, False])
def test_forward_is_the_block_rotation_of_the_input_written_out(neumann):
    mlp = MLP().eval()
    model = dt.wrap(mlp, dt.OFTConfig(targets=["fc1"], oft_block_size=4, init="random", use_cayley_neumann=neumann))
    fc1 = model.model.fc1
    packed = fc1.adapters["default"].oft_R.weight.detach()
    assert packed.shape == (4, 6)  # 16 inputs = 4 blocks of 4, 4*3/2 skew entries each
    rotation = torch.block_diag(*[hand_rotation(row, 4, neumann) for row in packed])
    x = torch.randn(3, 5, 16)
    weight, bias = fc1.weight.detach().double(), fc1.bias.detach().double()
    expected = x.double() @ rotation @ weight.T + bias  # y = W0 (R x) + b, x as row vectors: x R_bd W0^T
    with torch.no_grad():
        assert relative(fc1(x).double(), expected) <= 1e-6
        assert relative(fc1(x).double(), x.double() @ weight.T + bias) > 1e-2
    if not neumann:  # the exact Cayley transform is orthogonal
        assert torch.allclose(rotation @ rotation.T, torch.eye(16, dtype=torch.float64), atol=1e-12)


def test_merge_unmerge_and_merge_and_unload_are_exact():
    base = tiny_llama()
    originals = {k: v.clone() for k, v in base.state_dict().items()}
    model = ours(base, oft_block_size=8)
    expected = logits(model)
    model.merge()
    assert all(host.merged == ["default"] for _, host in model.hosts() if isinstance(host, DeltaLayer))
    assert relative(logits(model), expected) <= 1e-5
    changed = base.model.layers[0].self_attn.q_proj.weight
    assert relative(changed, originals["model.layers.0.self_attn.q_proj.weight"]) > 1e-2
    model.unmerge()
    now = base.state_dict()
    for name, tensor in originals.items():
        assert torch.allclose(now[name], tensor, atol=1e-6, rtol=0), name
    assert relative(logits(model), expected) <= 1e-6
    plain = model.merge_and_unload()
    assert type(plain).__name__ == "LlamaForCausalLM" and not any(isinstance(m, DeltaLayer) for m in plain.modules())
    assert relative(logits(plain), expected) <= 1e-5


@pytest.mark.parametrize("order", [["default", "b", "c"], ["c", "b", "default"], ["b", "c", "default"]])
def test_stacked_input_transforms_and_additive_deltas_merge_exactly(order):
    """Two OFT rotations and a LoRA active together: merging reproduces the forward W0 R_2 R_1 x + dW x whatever the
    active order (input transforms merge in reverse active order first, then the additive deltas)."""
    torch.manual_seed(0)
    model = ours(tiny_llama(), oft_block_size=8)
    model.add_adapter("b", dt.OFTConfig(targets=LLAMA_TARGETS, r=4, oft_block_size=0, init="random",
                                        use_cayley_neumann=False))
    model.add_adapter("c", dt.LoraConfig(r=4, targets=LLAMA_TARGETS, init="random"))
    model.set_adapter(order)
    originals = {k: v.clone() for k, v in model.model.state_dict().items() if "base_layer" not in k}
    expected = logits(model)
    model.merge()
    assert relative(logits(model), expected) <= 1e-5
    model.unmerge()
    now = model.model.state_dict()
    for name, tensor in originals.items():
        assert torch.allclose(now[name], tensor, atol=1e-5, rtol=0), name


def test_mixed_adapter_batch_rows_equal_single_runs():
    model = ours(tiny_llama(), oft_block_size=8)
    model.add_adapter("b", dt.OFTConfig(targets=["q_proj", "o_proj"], r=2, oft_block_size=0, init="random",
                                        use_cayley_neumann=False))
    ids = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(1))
    assert_rows_match_single_runs(model, ids, ["default", "__base__", "b", "default"])


def test_training_reduces_the_loss_and_only_oft_parameters_move():
    base = tiny_llama()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = dt.wrap(base, dt.OFTConfig(targets=LLAMA_TARGETS, oft_block_size=8))
    reference = peft.get_peft_model(tiny_llama(), peft.OFTConfig(target_modules=LLAMA_TARGETS, oft_block_size=8))
    per_layer = (4 + 4 + 8) * 28  # q, v: 32 inputs = 4 blocks, down: 64 = 8 blocks; 8 * 7 / 2 entries per block
    assert model.count_parameters()[0] == reference.get_nb_trainable_parameters()[0] == 2 * per_layer
    assert model.print_trainable().startswith("trainable: 896 / ")
    losses = train(model, steps=10, lr=5e-2)
    assert losses[-1] < losses[0] - 0.03 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert all(p.abs().max() > 0 for n, p in model.named_parameters() if "oft_R" in n)
    now = base.state_dict()
    assert all(torch.equal(now[name], tensor) for name, tensor in frozen.items())  # the base did not move


def train(model, steps: int, lr: float) -> list[float]:
    model.train()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=lr)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad and all("oft_R" in n for n in with_grad)
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_coft_keeps_every_skew_block_within_its_radius_while_training():
    model = dt.wrap(tiny_llama(), dt.OFTConfig(targets=LLAMA_TARGETS, oft_block_size=8, coft=True, eps=0.4))
    train(model, steps=3, lr=5e-2)
    model(input_ids=IDS)  # the projection runs before each use
    for name, packed in model.named_parameters():
        if "oft_R" in name:
            radius = 0.4 / packed.shape[0] ** 0.5
            assert dt_norm(packed) <= radius * (1 + 1e-5) and dt_norm(packed) > 0.5 * radius, name


def dt_norm(packed: torch.Tensor) -> float:
    """The largest Frobenius norm of the skew blocks stored in ``packed`` (each entry counted twice)."""
    return (2 * packed.detach().square().sum(-1)).sqrt().max().item()


def test_module_dropout_sets_whole_blocks_to_the_identity_in_training_only():
    model = ours(tiny_llama(), oft_block_size=4, module_dropout=0.5)
    delta = model.model.model.layers[0].self_attn.q_proj.adapters["default"]
    eye = torch.eye(4)
    delta.eval()
    assert not any(torch.allclose(block, eye) for block in delta.rotation())
    delta.train()
    identities = sum(torch.allclose(block, eye) for block in delta.rotation())
    assert identities == 4  # floor(0.5 * 8 blocks)


def test_round_trip_is_exact_and_fan_in_fan_out_and_bad_sizes_are_refused(tmp_path):
    model = ours(tiny_llama(), oft_block_size=8, block_share=True)
    model.save(tmp_path)
    again = dt.load(tiny_llama(), tmp_path)
    saved, loaded = adapter_tensors(model), adapter_tensors(again)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight" in keys
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "fan_in_fan_out": True}))
    with pytest.raises(ConfigError, match="fan_in_fan_out=True"):
        dt.load(tiny_llama(), tmp_path)
    with pytest.raises(ConfigError, match="exactly one of r"):
        dt.OFTConfig(r=4)
    with pytest.raises(ConfigError, match="init_weights"):
        dt.OFTConfig.from_peft_dict({**data, "init_weights": "gaussian"})


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in model.state_dict().items() if ".adapters." in name}


def test_unsupported_layers_are_refused_clearly_and_sizes_adjust_as_peft():
    with pytest.raises(TargetError, match="nn.Linear layers only; 'transformer.h.0.attn.c_attn' is Conv1D"):
        dt.wrap(tiny_gpt2(), dt.OFTConfig())
    with pytest.raises(TargetError, match="'embed' is Embedding"):
        dt.wrap(MLP(), dt.OFTConfig(targets=["embed", "fc1"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = dt.wrap(MLP(), dt.OFTConfig(targets=["fc1", "fc2"], oft_block_size=5))
        theirs = peft.get_peft_model(MLP(), peft.OFTConfig(target_modules=["fc1", "fc2"], oft_block_size=5))
    assert any("oft_block_size=5 does not divide in_features=16" in str(w.message) for w in caught)
    shapes = {n.split(".")[1]: tuple(p.shape) for n, p in model.named_parameters() if "oft_R" in n}
    peft_shapes = {n.split(".")[2]: tuple(p.shape) for n, p in theirs.named_parameters() if "oft_R" in n}
    assert shapes == peft_shapes == {"fc1": (4, 6), "fc2": (8, 6)}  # 5 -> 4 on both layers (16 and 32 inputs)


def test_cli_trains_oft_with_its_options(tmp_path, tiny_model):
    from conftest import sst2_slice
    from deltatune.cli import main

    data = sst2_slice(tmp_path / "sst2", {"train": 32, "dev": 16, "test": 16})
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--model", tiny_model, "--method", "oft", "--oft-block-size", "0",
            "--r", "4", "--use-cayley-neumann", "false", "--targets", "query,value", "--max-steps", "3",
            "--batch-size", "8", "--max-length", "32", "--max-eval", "16", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "OFT" and config["r"] == 4 and config["oft_block_size"] == 0
    assert config["use_cayley_neumann"] is False and sorted(config["target_modules"]) == ["query", "value"]
    tensors = load_file(out / "adapter_model.safetensors")
    rotations = {k: v for k, v in tensors.items() if k.endswith("oft_R.weight")}
    assert len(rotations) == 4 and all(v.shape == (4, 28) and v.abs().max() > 0 for v in rotations.values())


def test_two_active_adapters_rotate_in_active_order_as_peft(tmp_path):
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(target_modules=LLAMA_TARGETS, oft_block_size=8))
    theirs.add_adapter("b", peft.OFTConfig(target_modules=["q_proj"], r=2, oft_block_size=0, use_cayley_neumann=False))
    perturb_peft(theirs)
    theirs.save_pretrained(tmp_path)
    theirs.base_model.set_adapter(["default", "b"])
    model = dt.load(copy.deepcopy(base), tmp_path)
    model.load_adapter(tmp_path / "b", "b")
    model.set_adapter(["default", "b"])
    expected = logits(theirs)
    assert relative(logits(model), expected) <= 1e-5
    model.set_adapter(["b", "default"])  # rotations do not commute: the order matters
    assert relative(logits(model), expected) > 1e-4


def test_old_neumann_files_warn_and_oft_only_bias_is_accepted():
    data = dt.OFTConfig(targets=["q_proj"]).to_peft_dict()
    assert data["peft_version"] == "0.18.0"
    with pytest.warns(UserWarning, match="before PEFT 0.18.0"):
        dt.OFTConfig.from_peft_dict({**data, "peft_version": "0.17.1"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dt.OFTConfig.from_peft_dict({**data, "peft_version": "0.17.1", "use_cayley_neumann": False})
        dt.OFTConfig.from_peft_dict(data)
    config = dt.OFTConfig(bias="oft_only")
    assert config.bias == "lora_only" and config.to_peft_dict()["bias"] == "oft_only"


def test_dora_after_an_input_rotation_sees_the_rotated_output():
    """DoRA rescales the bare base output only when nothing else changed it: with OFT rotating the layer's input
    first, it takes its general path, so the stack equals the formula g * (W0 R x + s B A x) + (1 - g) b."""
    torch.manual_seed(0)
    model = ours(tiny_llama(), oft_block_size=8, targets=["q_proj"])
    model.add_adapter("d", dt.DoraConfig(r=4, targets=["q_proj"], init="random"))
    model.set_adapter(["d", "default"])
    host = next(h for _, h in model.hosts() if isinstance(h, DeltaLayer))
    x = torch.randn(3, host.base_layer.in_features)
    oft, dora = host.adapters["default"], host.adapters["d"]
    with torch.no_grad(), dt.kernels.disabled():
        dora.lora_magnitude_vector.mul_(1.3)  # g != 1: the bare-output shortcut would differ
        got = host(x)
        w0 = host.base_layer.weight
        rotated = torch.nn.functional.linear(oft.transform_input(x, host), w0)
        lora = dora.lora_B(dora.lora_A(x)) * dora.scaling
        g = dora.lora_magnitude_vector / dora.weight_norm(host)
        bias = host.base_layer.bias
        expected = rotated - torch.nn.functional.linear(x, w0) + g * (torch.nn.functional.linear(x, w0) + lora)
        expected = expected if bias is None else expected + bias
    assert relative(got.double(), expected.double()) <= 1e-5


def test_combining_block_sized_oft_adapters_asks_for_a_rank():
    """OFT sized by oft_block_size has r=0, which is no rank for the SVD-fitted LoRA: the combination asks for
    svd_rank instead of fitting a rank-0/1 LoRA; with svd_rank it fits the weighted rotation updates."""
    torch.manual_seed(0)
    model = dt.DeltaModel(tiny_llama(), dt.OFTConfig(oft_block_size=8, targets=["q_proj"], init="random"), "a")
    model.add_adapter("b", dt.OFTConfig(oft_block_size=8, targets=["q_proj"], init="random"))
    with pytest.raises(ConfigError, match="pass svd_rank"):
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "c")
    assert "c" not in model.configs
    report = model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "c", svd_rank=32)
    assert model.configs["c"].r == 32 and report.relative_error < 1e-5  # full rank of a 32-wide layer: exact
