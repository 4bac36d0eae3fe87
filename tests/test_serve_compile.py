"""``deltatune serve --compile``: the base is compiled (inductor, CPU) once the first adapter is loaded; every later
adapter is hot-swapped into a slot, so loading adapter N+1 causes zero recompiles (torch._dynamo's counters) and
its outputs equal the adapter's eager outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deltatune as dt

pytest.importorskip("fastapi")

from deltatune.cli import build_parser  # noqa: E402
from deltatune.serve.cli import build  # noqa: E402
from deltatune.train.models import load_model, load_tokenizer  # noqa: E402

TEXT = "a gripping, funny and moving film"
CONFIGS = {  # other ranks, alpha, rsLoRA rule and target sets; every one keeps its own classifier head
    "a": dt.LoraConfig(r=2, alpha=4, targets=["query", "value"], modules_to_save=["classifier"]),
    "b": dt.LoraConfig(r=4, alpha=2, rslora=True, targets=["query"], modules_to_save=["classifier"]),
    "c": dt.LoraConfig(r=8, alpha=16, targets=["query", "value"], modules_to_save=["classifier"]),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("compiled_adapters")
    for seed, (name, config) in enumerate(CONFIGS.items()):
        model = dt.wrap(load_model(tiny_model, "classification")[0], config, name)
        with torch.no_grad():
            for parameter in model.trainable_parameters():
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
        model.save(root / name, adapter=name)
    (root / "dora").mkdir()
    model = dt.wrap(load_model(tiny_model, "classification")[0], dt.DoraConfig(r=2, targets=["query"]), "dora")
    model.save(root / "dora", adapter="dora")
    return root


def eager_probs(tiny_model: str, folder: Path) -> list[float]:
    model = dt.load(load_model(tiny_model, "classification")[0], folder).eval()
    with torch.no_grad():
        logits = model(**load_tokenizer(tiny_model)([TEXT], return_tensors="pt")).logits
    return logits.float().softmax(-1)[0].tolist()


def test_compiled_server_loads_adapters_by_hot_swap_without_recompiling(adapters, tiny_model) -> None:
    from torch._dynamo.utils import counters

    argv = ["serve", "--model", tiny_model, "--adapters", *(f"{n}={adapters / n}" for n in (*CONFIGS, "dora")),
            "--compile", "--max-rank", "8", "--max-loaded", "1"]
    app, _ = build(build_parser().parse_args(argv))
    engine = app.state.engine

    def classify(name: str) -> list[float]:
        (result,) = engine.run("classify", [engine.check("classify", name, TEXT)])
        if isinstance(result, Exception):
            raise result
        return result["probs"]

    torch._dynamo.reset()
    counters.clear()
    assert classify("a") == pytest.approx(eager_probs(tiny_model, adapters / "a"), abs=1e-5)  # compiles here
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name in ("b", "c", "a"):  # each load evicts the previous adapter and swaps the new one into the slot
            assert classify(name) == pytest.approx(eager_probs(tiny_model, adapters / name), abs=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs
    registry = engine.registry
    assert registry.loads == 4 and registry.evictions == 3 and list(registry.loaded) == ["a"]
    assert list(registry.model.configs) == ["slot0"]  # one slot; adapters never added as modules
    with pytest.raises(dt.AdapterFileError, match="cannot be hot-swapped.*without --compile"):
        classify("dora")  # not LoRA-style: refused with the reason, the slot keeps adapter a
    assert classify("a") == pytest.approx(eager_probs(tiny_model, adapters / "a"), abs=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs


def test_max_rank_needs_compile_and_must_be_positive(tiny_model) -> None:
    for extra, message in ((["--max-rank", "8"], "goes with --compile"), (["--compile", "--max-rank", "0"], "positive")):
        with pytest.raises(dt.ConfigError, match=message):
            build(build_parser().parse_args(["serve", "--model", tiny_model, *extra]))


def test_compiled_server_combines_adapters_and_swaps_the_result_in(adapters, tiny_model) -> None:
    argv = ["serve", "--model", tiny_model, "--adapters", *(f"{n}={adapters / n}" for n in CONFIGS),
            "--compile", "--max-rank", "8", "--max-loaded", "3"]
    app, _ = build(build_parser().parse_args(argv))
    engine = app.state.engine
    options = {"combination_type": "svd", "svd_rank": 4, "modules_to_save_from": "a"}
    engine.registry.combine("ab", ["a", "b"], [1.0, 0.5], **options)
    (result,) = engine.run("classify", [engine.check("classify", "ab", TEXT)])
    offline = dt.load(load_model(tiny_model, "classification")[0], adapters / "a", name="a")
    dt.load(offline, adapters / "b", name="b")
    offline.add_weighted_adapter(["a", "b"], [1.0, 0.5], "ab", **options)
    offline.set_adapter("ab")
    with torch.no_grad():
        want = offline.eval()(**load_tokenizer(tiny_model)([TEXT], return_tensors="pt")).logits.softmax(-1)[0]
    assert result["probs"] == pytest.approx(want.tolist(), abs=1e-5)
    assert sorted(engine.registry.model.configs) == ["slot0", "slot1", "slot2"]  # the result went into a slot
