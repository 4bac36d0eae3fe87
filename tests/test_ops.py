"""Fast paths in deltatune.ops equal the plain formulas: outputs and gradients, with and without dropout."""

from __future__ import annotations

import contextlib

import pytest
import torch

import deltatune as dt
from deltatune import protocol
from deltatune.kernels import lora_fused
from deltatune.ops import (
    dora_linear,
    dora_linear_reference,
    keep_mask,
    lora_add,
    lora_linear,
    lora_linear_reference,
)
from deltatune.ops.lora import _use_merged

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _factors(in_f: int, out_f: int, r: int, dtype=torch.float32, frozen_a: bool = False):
    torch.manual_seed(1)
    weight = torch.randn(out_f, in_f, dtype=dtype) / in_f**0.5
    bias = torch.randn(out_f, dtype=dtype)
    a = (torch.randn(r, in_f) / in_f**0.5).requires_grad_(not frozen_a)
    b = torch.randn(out_f, r).requires_grad_()
    return weight, bias, a, b


def _grads(y: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
    torch.manual_seed(2)
    upstream = torch.randn_like(y)
    needed = [t for t in tensors if t.requires_grad]
    found = iter(torch.autograd.grad(y, needed, upstream))
    return [next(found) if t.requires_grad else None for t in tensors]


def _check(fast: list, ref: list, tol: dict) -> None:
    for got, want in zip(fast, ref):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("tokens", [2, 64])  # 2 tokens: branch path; 64 tokens: merged path when p = 0
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_matches_plain_formula(p: float, tokens: int, bias: bool) -> None:
    weight, b0, a, b = _factors(24, 40, 4)
    b0 = b0 if bias else None
    x = torch.randn(2, tokens // 2, 24, requires_grad=True)
    assert _use_merged(x, weight, a, p) == (p == 0 and tokens == 64)
    torch.manual_seed(5)
    y = lora_linear(x, weight, b0, a, b, 0.5, p)
    torch.manual_seed(5)
    keep = keep_mask(x, p) if p > 0 else None  # the op draws its mask first, from the same generator state
    ref = lora_linear_reference(x, weight, b0, a, b, 0.5, p, keep)
    torch.testing.assert_close(y, ref, **TOL)
    _check(_grads(y, [x, a, b]), _grads(ref, [x, a, b]), TOL)
    if p > 0:
        assert 0 < int(keep.sum()) < keep.numel()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_is_seeded_bernoulli(p: float) -> None:
    """keep_mask: bool, seeded by the default generator, P(drop) = p (5 sigma), neighbours independent."""
    x = torch.empty(1001, 301)  # odd number of elements: the last int64 word is half used
    torch.manual_seed(0)
    keep = keep_mask(x, p)
    torch.manual_seed(0)
    assert keep.dtype == torch.bool and keep.shape == x.shape and torch.equal(keep, keep_mask(x, p))
    assert not torch.equal(keep, keep_mask(x, p))
    drop = ~keep.flatten()
    n = drop.numel()
    assert abs(int(drop.sum()) - n * p) < 5 * (n * p * (1 - p)) ** 0.5
    pairs = drop[: n - 1].view(-1, 2)  # two bytes of one random int64 word
    both, m = int((pairs[:, 0] & pairs[:, 1]).sum()), pairs.shape[0]
    assert abs(both - m * p * p) < 5 * (m * p * p * (1 - p * p)) ** 0.5


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_add_matches_plain_formula(p: float) -> None:
    weight, b0, a, b = _factors(16, 12, 3)
    x = torch.randn(3, 5, 16, requires_grad=True)
    out = (x @ weight.T + b0).detach().requires_grad_()
    torch.manual_seed(7)
    y = lora_add(x, out, a, b, 2.0, p)
    torch.manual_seed(7)
    keep = keep_mask(x, p) if p > 0 else None
    ref = out + (lora_linear_reference(x, weight, None, a, b, 2.0, p, keep) - x @ weight.T)
    torch.testing.assert_close(y, ref, **TOL)
    _check(_grads(y, [x, out, a, b]), _grads(ref, [x, out, a, b]), TOL)


def test_frozen_a_and_input_without_grad() -> None:
    """AsyLoRA shape: A frozen, x needs no gradient; only B's gradient is computed, x is not kept."""
    weight, b0, a, b = _factors(20, 20, 2, frozen_a=True)
    x = torch.randn(40, 20)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora_linear(x, weight, b0, a, b, 1.5)
    assert not any(t.data_ptr() == x.data_ptr() for t in saved)
    ref = lora_linear_reference(x, weight, b0, a, b, 1.5)
    torch.testing.assert_close(y, ref, **TOL)
    _check(_grads(y, [a, b]), _grads(ref, [a, b]), TOL)


def test_low_precision_base_keeps_lora_in_float32() -> None:
    """bf16 base, float32 LoRA: same op order as the plain formula (update in float32, rounded once, added)."""
    weight, b0, a, b = _factors(32, 32, 4, dtype=torch.bfloat16)
    x = torch.randn(4, 32, 32, dtype=torch.bfloat16, requires_grad=True)
    assert not _use_merged(x, weight, a, 0.0)
    y = lora_linear(x, weight, b0, a, b, 2.0)
    ref = lora_linear_reference(x, weight, b0, a, b, 2.0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, atol=1e-2, rtol=1e-2)
    _check(_grads(y, [x, a, b]), _grads(ref, [x, a, b]), {"atol": 2e-2, "rtol": 2e-2})


def test_no_grad_paths_match() -> None:
    weight, b0, a, b = _factors(24, 40, 4)
    for tokens in (2, 200):
        x = torch.randn(tokens, 24)
        with torch.no_grad():
            torch.testing.assert_close(lora_linear(x, weight, b0, a, b, 0.5),
                                       lora_linear_reference(x, weight, b0, a, b, 0.5), **TOL)


def _saved_bytes(fn) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_dropout_keeps_a_one_bit_mask_on_cpu() -> None:
    """Saved for backward with dropout: x, h^T and the mask packed to 1 bit per element, vs the plain formula's
    extra float copy of the dropped-out input (and its mask)."""
    weight, b0, a, b = _factors(64, 64, 4)
    x = torch.randn(512, 64, requires_grad=True)
    fused = _saved_bytes(lambda: lora_linear(x, weight, b0, a, b, 1.0, 0.1))
    plain = _saved_bytes(lambda: lora_linear_reference(x, weight, b0, a, b, 1.0, 0.1))
    n = x.numel()
    assert fused <= 4 * n + n // 8 + 4 * 512 * 4 + 2 * (64 * 64 + 64 + 2 * 64 * 4) * 4
    assert plain - fused >= 4 * n - n // 8  # a float copy of x saved by the plain formula, less our packed bits


@pytest.mark.parametrize("seeded", [True, False])
@pytest.mark.parametrize("add", [False, True])
def test_seeded_and_kept_mask_paths_match(monkeypatch, seeded: bool, add: bool) -> None:
    """Both mask paths are exact: seeded (CPU eager, bits packed for backward) and the bool mask kept for backward
    (used off CPU and while compiling), for ``lora_linear`` and ``lora_add``."""
    from deltatune.ops import dropout, lora

    monkeypatch.setattr(dropout, "seeded", lambda x: seeded)
    monkeypatch.setattr(lora, "seeded", lambda x: seeded)
    weight, b0, a, b = _factors(24, 40, 4)
    x = torch.randn(3, 5, 24, requires_grad=True)
    out = (x @ weight.T + b0).detach().requires_grad_()
    torch.manual_seed(3)
    y = lora_add(x, out, a, b, 0.5, 0.4) if add else lora_linear(x, weight, b0, a, b, 0.5, 0.4)
    torch.manual_seed(3)
    keep = keep_mask(x, 0.4)
    ref = lora_linear_reference(x, weight, b0, a, b, 0.5, 0.4, keep)
    if add:
        ref = out + (ref - (x @ weight.T + b0))
    torch.testing.assert_close(y, ref, **TOL)
    tensors = [x, out, a, b] if add else [x, a, b]
    _check(_grads(y, tensors), _grads(ref, tensors), TOL)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("needs", ["x,a,b", "a,b", "x,b", "b"])
def test_chunked_dropout_path_matches_plain_formula(monkeypatch, bias: bool, needs: str) -> None:
    """The CPU dropout path in row chunks: many chunks, a short last one, an in-width that is not a multiple of 8,
    each combination of gradients asked for; same mask as a whole-tensor draw."""
    from deltatune.ops import lora_chunked

    monkeypatch.setattr(lora_chunked, "CHUNK_ELEMENTS", 8 * 23)  # 8 rows of 23 per chunk
    assert lora_chunked.rows_per_chunk(23) == 8
    weight, b0, a, b = _factors(23, 30, 3, frozen_a="a" not in needs)
    b0 = b0 if bias else None
    x = torch.randn(5, 13, 23, requires_grad="x" in needs)  # 65 rows: 8 full chunks and 1 row
    torch.manual_seed(4)
    y = lora_linear(x, weight, b0, a, b, 0.7, 0.3)
    torch.manual_seed(4)
    ref = lora_linear_reference(x, weight, b0, a, b, 0.7, 0.3, keep_mask(x, 0.3))
    torch.testing.assert_close(y, ref, **TOL)
    _check(_grads(y, [x, a, b]), _grads(ref, [x, a, b]), TOL)


def test_chunked_dropout_path_in_bfloat16() -> None:
    """All-bf16 layer (x, W and LoRA factors): the chunked path keeps the dtype and matches the plain formula."""
    weight, b0, a, b = _factors(32, 48, 4, dtype=torch.bfloat16)
    a, b = a.detach().bfloat16().requires_grad_(), b.detach().bfloat16().requires_grad_()
    x = torch.randn(3, 40, 32, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(6)
    y = lora_linear(x, weight, b0, a, b, 2.0, 0.2)
    torch.manual_seed(6)
    ref = lora_linear_reference(x, weight, b0, a, b, 2.0, 0.2, keep_mask(x, 0.2))
    assert y.dtype == torch.bfloat16

    def close(got: torch.Tensor, want: torch.Tensor) -> None:  # within 2 bf16 ulps of the largest value
        torch.testing.assert_close(got, want, atol=2**-7 * float(want.abs().max()), rtol=0)

    close(y, ref)
    for got, want in zip(_grads(y, [x, a, b]), _grads(ref, [x, a, b])):
        close(got, want)


def test_keep_stream_is_the_same_in_any_chunking_and_decides_ties_on_32_bits() -> None:
    """Chunks of multiples of 8 give the whole draw's mask; elements whose top byte ties the threshold's are split
    by 24 more bits: with p = (t + 1/2) / 256, about half of the ties are dropped (5 sigma)."""
    import numpy as np

    from deltatune.ops.dropout import KeepStream

    whole = KeepStream(7, 0.1).draw(10_001)
    stream = KeepStream(7, 0.1)
    parts = [stream.draw(m) for m in (8, 4000, 16, 5976, 1)]
    assert np.array_equal(np.concatenate(parts), whole)
    p, n = (25 + 0.5) / 256, 2_000_000
    keep = KeepStream(3, p).draw(n)
    top = np.random.PCG64(np.random.SeedSequence(3).spawn(2)[0]).random_raw((n + 7) // 8).view(np.uint8)
    assert np.array_equal(keep[top < 25], np.zeros(int((top < 25).sum()), bool))
    assert keep[top > 25].all()
    tied = keep[top == 25]
    assert abs(int((~tied).sum()) - tied.size / 2) < 5 * (tied.size / 4) ** 0.5 and tied.size > 7000


@contextlib.contextmanager
def _unfused():
    """Without the "fused" kernels: the base layer, then the delta's "add" kernel or forward (LoRA's "add" kernel
    draws the same dropout stream as its fused one)."""
    saved = {t: kinds.pop("fused") for t, kinds in protocol._KERNELS.items() if "fused" in kinds}
    try:
        yield
    finally:
        for delta_type, fused in saved.items():
            protocol._KERNELS[delta_type]["fused"] = fused


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_wrapped_llama_training_step_fused_equals_unfused(dropout: float) -> None:
    from conftest import tiny_llama

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, alpha=8, dropout=dropout, init="random", targets="all-linear"))
        models.append(model.train())
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    results = []
    for model, context in zip(models, (contextlib.nullcontext(), _unfused())):
        torch.manual_seed(11)  # both draw the same dropout masks in the same order
        with context:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[0][0], results[1][0], **TOL)
    assert results[0][1].keys() == results[1][1].keys() and len(results[0][1]) == 2 * 7 * 2
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-5, rtol=1e-4)


def test_fused_path_skips_hooked_and_trainable_bases(mlp) -> None:
    model = dt.wrap(mlp, dt.LoraConfig(r=2, targets=["fc1"], init="random"))
    layer = model.get_submodule("base_model.fc1") if hasattr(model, "base_model") else None
    layer = layer or next(m for m in model.modules() if type(m).__name__ == "DeltaLayer")
    delta = next(iter(layer.adapters.values()))
    x = torch.randn(3, 16)
    assert lora_fused(delta, x, layer) is not None
    handle = layer.base_layer.register_forward_hook(lambda m, i, o: o)
    assert lora_fused(delta, x, layer) is None
    handle.remove()
    layer.base_layer.weight.requires_grad_(True)
    assert lora_fused(delta, x, layer) is None


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_kernels_off_runs_the_plain_formula_with_equal_results(method: str) -> None:
    """``dt.kernels.disabled()``: every delta runs its plain ``forward``; values and gradients equal the kernels'."""
    from conftest import tiny_llama

    config = (dt.LoraConfig if method == "lora" else dt.DoraConfig)(r=4, alpha=8, init="random", targets="all-linear")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    results = []
    for off in (False, True):
        torch.manual_seed(0)
        model = dt.wrap(tiny_llama(), config)
        calls = {"n": 0}

        def count(*args, _original=protocol.kernel, _calls=calls):
            found = _original(*args)
            _calls["n"] += found is not None
            return found

        with dt.kernels.disabled() if off else contextlib.nullcontext(), _patched(protocol, "kernel", count):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        assert dt.kernels.enabled()
        assert (calls["n"] == 0) == off  # kernels ran exactly when on
        results.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[0][0], results[1][0], **TOL)
    for fast, plain in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)


@contextlib.contextmanager
def _patched(owner, name, value):
    """``owner.name = value`` inside the block; the host module looked the name up at import, so patch it there too."""
    from deltatune import layers

    saved = getattr(owner, name), getattr(layers, name)
    setattr(owner, name, value)
    setattr(layers, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved[0])
        setattr(layers, name, saved[1])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen_a", [False, True])
def test_dora_linear_matches_plain_formula(bias: bool, frozen_a: bool) -> None:
    weight, b0, a, b = _factors(24, 40, 4, frozen_a=frozen_a)
    b0 = b0 if bias else None
    magnitude = (torch.rand(40) + 0.5).requires_grad_()
    norm = torch.linalg.vector_norm(weight + 0.5 * b.detach() @ a.detach(), dim=1)
    x = torch.randn(3, 7, 24, requires_grad=True)
    y = dora_linear(x, weight, b0, a, b, magnitude, norm, 0.5)
    ref = dora_linear_reference(x, weight, b0, a, b, magnitude, norm, 0.5)
    torch.testing.assert_close(y, ref, **TOL)
    _check(_grads(y, [x, a, b, magnitude]), _grads(ref, [x, a, b, magnitude]), TOL)
    with torch.no_grad():
        torch.testing.assert_close(dora_linear(x, weight, b0, a, b, magnitude, norm, 0.5), ref, **TOL)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_wrapped_dora_training_step_fused_equals_unfused(arch: str) -> None:
    import conftest

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        base = conftest.tiny_llama() if arch == "llama" else conftest.tiny_gpt2()
        model = dt.wrap(base, dt.DoraConfig(r=4, alpha=8, init="random", targets="all-linear"))
        models.append(model.train())
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    results = []
    for model, context in zip(models, (contextlib.nullcontext(), _unfused())):
        torch.manual_seed(11)  # GPT-2's own dropouts
        with context:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[0][0], results[1][0], **TOL)
    assert any("lora_magnitude_vector" in n for n in results[0][1])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-5, rtol=1e-4)


def _compile_or_skip(module: torch.nn.Module, sample) -> torch.nn.Module:
    """``torch.compile(fullgraph=True)`` with inductor: a graph break in the LoRA path is an error."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor on CPU needs a C++ compiler; none found")
    compiled = torch.compile(module, backend="inductor", fullgraph=True)
    try:
        compiled(sample)
    except Exception as error:  # noqa: BLE001
        if "graph break" in str(error).lower() or "Unsupported" in type(error).__name__:
            raise
        pytest.skip(f"inductor cannot compile here: {type(error).__name__}: {str(error)[:200]}")
    return compiled


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_torch_compile_inductor_no_graph_breaks(mlp, method: str) -> None:
    """The wrapped model compiles as one graph (fullgraph=True) and matches eager: outputs and gradients."""
    torch._dynamo.reset()
    config_cls = dt.LoraConfig if method == "lora" else dt.DoraConfig
    model = dt.wrap(mlp, config_cls(r=2, alpha=4, init="random", targets=["fc1", "fc2"])).train()
    ids = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(0))
    compiled = _compile_or_skip(model, ids)
    params = [p for p in model.parameters() if p.requires_grad]
    eager_out = model(ids)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), params)
    out = compiled(ids)
    grads = torch.autograd.grad(out.square().sum(), params)
    torch.testing.assert_close(out, eager_out, **TOL)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_with_lora_dropout(mlp) -> None:
    """With dropout the fused op's bool mask compiles too (masks differ from eager's RNG; check shape and grads)."""
    torch._dynamo.reset()
    model = dt.wrap(mlp, dt.LoraConfig(r=2, alpha=4, dropout=0.5, init="random", targets=["fc1", "fc2"])).train()
    ids = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(0))
    compiled = _compile_or_skip(model, ids)
    out = compiled(ids)
    out.square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert out.shape == (8, 4) and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_backward_twice_with_retain_graph(method: str) -> None:
    """Backward does not consume what it saved: a second backward (retain_graph) gives the same gradients."""
    weight, b0, a, b = _factors(24, 40, 4)
    x = torch.randn(3, 30, 24, requires_grad=True)
    magnitude = (torch.rand(40) + 0.5).requires_grad_()
    norm = torch.linalg.vector_norm(weight, dim=1)
    if method == "lora":
        y = lora_linear(x, weight, b0, a, b, 0.5, 0.3)
        tensors = [x, a, b]
    else:
        y = dora_linear(x, weight, b0, a, b, magnitude, norm, 0.5)
        tensors = [x, a, b, magnitude]
    upstream = torch.randn_like(y)
    first = torch.autograd.grad(y, tensors, upstream, retain_graph=True)
    second = torch.autograd.grad(y, tensors, upstream)
    for got, want in zip(second, first):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_untested_torch_releases_skip_the_private_api_paths(monkeypatch, mlp) -> None:
    """On a torch the internals were not checked against, the kernels decline and the plain formulas run."""
    from deltatune.ops import compat, recompute

    assert compat.private_api_ok("2.13.0+cpu") and not compat.private_api_ok("2.14.0") and not compat.private_api_ok("x")
    model = dt.wrap(mlp, dt.LoraConfig(r=2, targets=["fc1"], init="random"))
    layer = next(m for m in model.modules() if type(m).__name__ == "DeltaLayer")
    delta = next(iter(layer.adapters.values()))
    x = torch.randn(3, 16, requires_grad=True)
    ids = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(0))
    before = model(ids)
    assert lora_fused(delta, x, layer) is not None and recompute.plan(torch.nn.functional.gelu(x)) is not None
    monkeypatch.setattr(compat, "PRIVATE_API_OK", False)
    assert lora_fused(delta, x, layer) is None
    assert recompute.plan(torch.nn.functional.gelu(x)) is None
    torch.testing.assert_close(model(ids), before, **TOL)
