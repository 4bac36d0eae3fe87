"""add_weighted_adapter: every combination type checked against the dense task-vector reference (sum_i w_i dW_i,
TIES/DARE/magnitude pruning on dW_i, Eckart-Young truncation), against HF PEFT where PEFT is right (``*_svd`` on
plain LoRA), and against PEFT's wrong answers where it is not (linear on LoRA factors, rsLoRA in cat)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.combine import canonical
from deltatune.layers import DeltaLayer, layer_kind
from deltatune.task_vectors import combine_dense, dare_drop, magnitude_trim


class Tiny(nn.Module):
    """ids -> embedding -> q -> relu -> v -> conv1d: every layer kind LoRA takes except Conv1D."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.q = nn.Linear(8, 12)
        self.v = nn.Linear(12, 8)
        self.conv = nn.Conv1d(8, 6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.v(torch.relu(self.q(self.emb(ids))))
        return self.conv(h.transpose(1, 2))


IDS = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(5))


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


def dense(model: dt.DeltaModel, name: str) -> dict[str, torch.Tensor]:
    """path -> canonical [out, in] dW of adapter ``name`` (float64)."""
    return {
        path: canonical(layer_kind(host), host.adapters[name].delta_weight(host)).double()
        for path, host in model.hosts()
        if isinstance(host, DeltaLayer) and name in host.adapters
    }


def reference(model: dt.DeltaModel, names: list[str], weights: list[float], rule=None) -> dict[str, torch.Tensor]:
    """sum_i w_i dW_i per layer (a layer an adapter lacks: dW_i = 0), or ``rule(tensors, weights)``."""
    parts = [dense(model, n) for n in names]
    paths = list(dict.fromkeys(p for part in parts for p in part))  # the model's layer order, as DARE draws
    out = {}
    for path in paths:
        members = [(p[path], w) for p, w in zip(parts, weights) if path in p]
        out[path] = rule([t for t, _ in members], [w for _, w in members]) if rule else sum(w * t for t, w in members)
    return out


def three_adapters() -> dt.DeltaModel:
    """LoRA r=2 (emb, q, v), rsLoRA r=3 with a rank pattern (q, v), AsyLoRA r=4 (q); random, different scalings."""
    model = dt.wrap(tiny(), dt.LoraConfig(r=2, alpha=4, targets=["emb", "q", "v", "conv"], init="random"), "a")
    model.add_adapter("b", dt.LoraConfig(r=3, alpha=5, rslora=True, rank_pattern={"v": 5}, targets=["q", "v"], init="random"))
    model.add_adapter("c", dt.AsyLoraConfig(r=4, alpha=2, targets=["q"], init="random"))
    return model


def test_cat_is_exactly_the_weighted_sum_of_task_vectors() -> None:
    model = three_adapters()
    weights = [1.0, -0.5, 2.0]
    report = model.add_weighted_adapter(["a", "b", "c"], weights, "abc", combination_type="cat")
    got, want = dense(model, "abc"), reference(model, ["a", "b", "c"], weights)
    assert sorted(got) == sorted(want) == ["conv", "emb", "q", "v"]
    for path in want:
        assert torch.allclose(got[path], want[path], atol=1e-6 * want[path].abs().max().item()), path
    assert report.ranks == {"emb": 2, "q": 2 + 3 + 4, "v": 2 + 5, "conv": 2} and report.relative_error == 0.0
    assert model.configs["abc"].r == 9 and model.configs["abc"].rank_pattern == {"emb": 2, "v": 7, "conv": 2}
    model.add_weighted_adapter(["a", "b", "c"], [1, np.float32(1), 1.0], "sum", combination_type="cat")
    with torch.no_grad():
        model.set_adapter(["a", "b", "c"])
        together = model(IDS)
        model.set_adapter("sum")
        assert torch.allclose(model(IDS), together, atol=1e-5)


def test_svd_is_the_best_rank_k_approximation_with_its_error_reported() -> None:
    model = three_adapters()
    weights = [0.7, 1.3, -1.0]
    report = model.add_weighted_adapter(["a", "b", "c"], weights, "k3", combination_type="svd", svd_rank=3)
    got, want = dense(model, "k3"), reference(model, ["a", "b", "c"], weights)
    residual = total = 0.0
    for path, target in want.items():
        u, s, vh = torch.linalg.svd(target)
        k = min(3, s.numel())
        best = u[:, :k] * s[:k] @ vh[:k]
        assert torch.allclose(got[path], best, atol=1e-5 * target.abs().max().item()), path
        error = (target - best).norm() / target.norm()
        assert report.errors[path] == pytest.approx(error.item(), rel=1e-3, abs=1e-6)
        residual, total = residual + (target - best).norm().item() ** 2, total + target.norm().item() ** 2
    assert report.ranks["q"] == 3 and report.ranks["emb"] == 2  # emb: only 'a' (rank 2) adapts it
    assert report.relative_error == pytest.approx(math.sqrt(residual / total), rel=1e-3)
    assert report.errors["q"] > 0.01  # rank 9 truncated to 3: the error is real and reported


def test_dense_rules_on_hand_computed_numbers() -> None:
    t1, t2 = torch.tensor([3.0, -1.0, 0.5, 2.0]), torch.tensor([-2.0, -4.0, 1.0, 0.1])
    # trim to 2 entries each: [3, 0, 0, 2], [-2, -4, 0, 0]; elected signs (total) +, -, +, +; disjoint mean
    assert combine_dense([t1, t2], [1.0, 1.0], "ties", density=0.5).tolist() == [3.0, -4.0, 0.0, 2.0]
    assert combine_dense([t1, t2], [1.0, 0.5], "ties_svd", density=0.5).tolist() == [3.0, -2.0, 0.0, 2.0]
    assert combine_dense([t1, t2], [1.0, 0.5], "magnitude_prune", density=0.5).tolist() == [2.0, -2.0, 0.0, 2.0]
    assert combine_dense([t1, t2], [2.0, 1.0], "linear").tolist() == (2 * t1 + t2).tolist()
    assert magnitude_trim(t1, 0.25).tolist() == [3.0, 0.0, 0.0, 0.0]
    # frequency: entry 3 has signs (+, +) -> +; entry 0 (+, -) -> tie -> +
    got = combine_dense([t1, t2], [1.0, 1.0], "ties", 1.0, "frequency")
    assert torch.allclose(got, torch.tensor([3.0, -2.5, 0.75, 1.05]))


def test_dare_drops_with_p_and_rescales_seeded() -> None:
    t = torch.randn(200, 50, generator=torch.Generator().manual_seed(0))
    dropped = dare_drop(t, 0.3, torch.Generator().manual_seed(1))
    kept = dropped != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    assert torch.allclose(dropped[kept], t[kept] / 0.3)
    again = dare_drop(t, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(dropped, again)
    mean = sum(dare_drop(t, 0.5, torch.Generator().manual_seed(s)) for s in range(400)) / 400
    assert (mean - t).abs().mean() < 0.05 * t.abs().mean()  # unbiased: E[drop(t)] = t
    model = three_adapters()
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "d1", "dare_linear", svd_rank=9, density=1.0)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "l1", "linear", svd_rank=9)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "s0", "dare_ties_svd", svd_rank=2, density=0.5, seed=3)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "s1", "dare_ties_svd", svd_rank=2, density=0.5, seed=3)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "s2", "dare_ties_svd", svd_rank=2, density=0.5, seed=4)
    d1, l1, s0, s1, s2 = (dense(model, n) for n in ("d1", "l1", "s0", "s1", "s2"))
    assert all(torch.allclose(d1[p], l1[p], atol=1e-6) for p in l1)
    assert all(torch.equal(s0[p], s1[p]) for p in s0) and not torch.allclose(s0["q"], s2["q"])


@pytest.mark.parametrize("kind", ["ties", "dare_linear", "magnitude_prune_svd"])
def test_types_apply_their_rule_to_the_dense_task_vectors(kind: str) -> None:
    model = three_adapters()
    weights = [1.0, 0.8]
    model.add_weighted_adapter(["a", "b"], weights, "x", kind, svd_rank=12, density=0.4, seed=7)
    generator = torch.Generator().manual_seed(7)  # the same draws, in the same (layer, adapter) order
    want = reference(model, ["a", "b"], weights, lambda ts, ws: combine_dense(ts, ws, kind, 0.4, "total", generator))
    got = dense(model, "x")
    for path in want:  # rank 12 >= every layer's full rank: the SVD representation is exact
        assert torch.allclose(got[path], want[path], atol=1e-5 * want[path].abs().max().item()), path


def test_dora_combines_by_merged_weights_and_cat_refuses_it() -> None:
    model = dt.wrap(tiny(), dt.DoraConfig(r=2, alpha=4, targets=["q", "v"], init="random"), "d")
    with torch.no_grad():
        for _, host in model.hosts():
            host.adapters["d"].lora_magnitude_vector.mul_(1.3)
    model.add_adapter("a", dt.LoraConfig(r=2, targets=["q"], init="random"))
    base = {p: h.weight.detach().double().clone() for p, h in model.hosts()}
    merged_d = {}
    model.merge("d")
    merged_d = {p: h.weight.detach().double().clone() for p, h in model.hosts()}
    model.unmerge()
    dw_a = dense(model, "a")
    model.add_weighted_adapter(["d", "a"], [0.5, 2.0], "mix", "linear", svd_rank=12)
    model.merge("mix")
    for path, host in model.hosts():
        want = base[path] + 0.5 * (merged_d[path] - base[path]) + 2.0 * dw_a.get(path, 0)
        assert torch.allclose(host.weight.double(), want, atol=1e-5), path
    model.unmerge()
    with pytest.raises(dt.ConfigError, match="'cat' needs low-rank factors.*svd"):
        model.add_weighted_adapter(["d", "a"], [1.0, 1.0], "c", "cat")
    assert "c" not in model.configs


def test_refusals_name_the_problem_and_leave_the_model_unchanged() -> None:
    model = three_adapters()
    model.add_adapter("hb", dt.HoulsbyConfig(bottleneck=4, targets=["v"]))
    before = sorted(model.configs)
    cases = [
        ((["a", "hb"], [1, 1], "x"), {}, "not a weight update"),
        ((["a", "b"], [1], "x"), {}, "one weight per adapter"),
        ((["a", "zz"], [1, 1], "x"), {}, "no adapters named"),
        ((["a", "b"], [1, 1], "a"), {}, "already exists"),
        ((["a", "b"], [1, 1], "x"), {"combination_type": "tie"}, "unknown"),
        ((["a", "b"], [1, 1], "x"), {"combination_type": "ties"}, "needs density"),
        ((["a", "b"], [1, 1], "x"), {"combination_type": "svd", "density": 0.5}, "density only applies"),
        ((["a", "b"], [1, 1], "x"), {"combination_type": "cat", "svd_rank": 4}, "does not apply to 'cat'"),
        ((["a", "b"], [1, float("nan")], "x"), {}, "finite"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(dt.ConfigError, match=message):
            model.add_weighted_adapter(*args, **kwargs)
    model.set_adapter("a")
    model.merge()
    with pytest.raises(dt.MergeError, match="unmerge"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "x")
    model.unmerge()
    pissa = dt.wrap(tiny(), dt.LoraConfig(r=2, targets=["q"], init="pissa"), "p")
    with pytest.raises(dt.ConfigError, match="save it"):
        pissa.add_weighted_adapter(["p"], [1], "x")
    assert sorted(model.configs) == before


def test_combined_adapter_round_trips_merges_and_serves_mixed_batches(tmp_path) -> None:
    model = three_adapters()
    model.add_weighted_adapter(["a", "b", "c"], [1.0, 0.5, -1.0], "abc", combination_type="cat")
    model.set_adapter("abc")
    with torch.no_grad():
        want = model(IDS)
    model.save(tmp_path / "abc", adapter="abc")
    loaded = dt.load(tiny(), tmp_path / "abc")
    assert loaded.configs["default"].rank_pattern == model.configs["abc"].rank_pattern
    with torch.no_grad():
        assert torch.allclose(loaded(IDS), want, atol=1e-5)
        plain = loaded.merge_and_unload()
        assert torch.allclose(plain(IDS), want, atol=1e-5)
        rows = torch.cat([IDS[:1], IDS[:1], IDS[:1]])
        mixed = model(rows, adapter_names=["abc", "a", "__base__"])
        model.set_adapter("a")
        alone_a = model(IDS[:1])
        with model.disable_adapters():
            alone_base = model(IDS[:1])
    assert torch.allclose(mixed[0], want[0], atol=1e-5) and torch.allclose(mixed[1], alone_a[0], atol=1e-5)
    assert torch.allclose(mixed[2], alone_base[0], atol=1e-6)


class Gpt2Style(nn.Module):
    """A transformers Conv1D (weight [in, out]) between two Linears."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.up = Conv1D(16, 8)
        self.down = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_mora_and_conv1d_layers_combine_through_their_dense_deltas() -> None:
    torch.manual_seed(0)
    model = dt.wrap(Gpt2Style().eval(), dt.LoraConfig(r=2, alpha=4, targets=["up", "down"], init="random"), "a")
    model.add_adapter("m", dt.MoraConfig(r=2, targets=["up", "down"], init="random"))
    weights = [1.0, -0.5]
    model.add_weighted_adapter(["a", "m"], weights, "am", "linear", svd_rank=16)
    got, want = dense(model, "am"), reference(model, ["a", "m"], weights)
    for path in want:  # rank 16 >= full rank of both layers: exact
        assert torch.allclose(got[path], want[path], atol=1e-5 * want[path].abs().max().item()), path
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    # the combined adapter's effect on the Conv1D layer's output is the weighted sum of the adapters' effects
    up = model.model.up
    with torch.no_grad():
        model.set_adapter("am")
        h = up(x)
        model.set_adapter(["a"])
        ha = up(x)
        model.set_adapter(["m"])
        hm = up(x)
        with model.disable_adapters():
            h0 = up(x)
    assert torch.allclose(h - h0, (ha - h0) - 0.5 * (hm - h0), atol=1e-5)
    assert (hm - h0).abs().max() > 0.1 and (ha - h0).abs().max() > 0.1
