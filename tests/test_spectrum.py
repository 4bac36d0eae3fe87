"""Spectrum of dW (``deltatune.spectrum``, ``deltatune inspect --spectrum``): ranks are exact on planted updates."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from conftest import tiny_bert_model
from deltatune import spectrum
from deltatune.cli import main
from deltatune.layers import DeltaLayer


def test_rank_measures_on_known_spectra():
    assert spectrum.energy_rank(torch.tensor([1.0, 1.0, 1.0, 0.0])) == 3
    assert spectrum.energy_rank(torch.tensor([3.0, 0.9, 0.1])) == 1  # 9 / 9.82 >= 0.9
    assert spectrum.energy_rank(torch.tensor([3.0, 1.0, 0.1])) == 2  # 9 / 10.01 < 0.9
    assert spectrum.energy_rank(torch.zeros(4)) == 0
    assert spectrum.entropy_rank(torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0])) == pytest.approx(4.0, abs=1e-12)
    # p = (1/2, 1/4, 1/4): H = 1.5 log 2, erank = 2 ** 1.5
    assert spectrum.entropy_rank(torch.tensor([3.5, 1.75, 1.75])) == pytest.approx(2**1.5, abs=1e-12)


@pytest.mark.parametrize("r", [1, 4, 8])
def test_lora_of_rank_r_has_exactly_r_nonzero_singular_values(llama, r):
    model = dt.wrap(llama, dt.LoraConfig(r=r, alpha=2 * r, init="random", targets="all-linear"))
    records = spectrum.spectra(spectrum.adapter_deltas(model))
    assert len(records) == 2 * 7  # q, k, v, o, gate, up, down in 2 layers
    for rec in records:
        s = torch.tensor(rec["singular_values"], dtype=torch.float64)
        assert rec["numerical_rank"] == r, rec["layer"]
        assert (s[r:] / s[0]).max().item() < 1e-6 if s.numel() > r else True
        assert s[r - 1] / s[0] > 1e-3
        assert 1 <= rec["rank90"] <= r and 1 <= rec["erank"] <= r * (1 + 1e-4)  # float32 dW: noise at ~1e-7


@pytest.mark.parametrize("config", [
    dt.LoraConfig(r=4, alpha=8, init="random", targets="all-linear"),
    dt.DoraConfig(r=4, init="random", targets="all-linear"),
    dt.MoraConfig(r=4, init="random", targets="all-linear"),
    dt.AsyLoraConfig(r=4, init="random", targets="all-linear") if hasattr(dt, "AsyLoraConfig") else None,
], ids=["lora", "dora", "mora", "asylora"])
def test_spectrum_equals_svdvals_of_the_explicitly_merged_update(llama, config):
    if config is None:
        pytest.skip("no AsyLoRA")
    with torch.no_grad():  # DoRA with a random init needs a non-trivial magnitude to differ from W0
        model = dt.wrap(llama, config)
        for _, host in model.hosts():
            delta = host.adapters["default"] if isinstance(host, DeltaLayer) else None
            if delta is not None and hasattr(delta, "lora_magnitude_vector"):
                delta.lora_magnitude_vector.mul_(1.5)
    records = {r["layer"]: r for r in spectrum.spectra(spectrum.adapter_deltas(model))}
    before = {p: h.weight.detach().double().clone() for p, h in model.hosts() if isinstance(h, DeltaLayer)}
    model.merge()
    for path, host in model.hosts():
        if not isinstance(host, DeltaLayer):
            continue
        explicit = torch.linalg.svdvals(host.weight.detach().double() - before[path])
        ours = torch.tensor(records[path]["singular_values"], dtype=torch.float64)
        scale = explicit[0].item()
        assert scale > 1e-3
        # the merged weight is float32: W0 + dW loses ~1e-7 * |W0| per entry, hence the absolute tolerance
        assert torch.allclose(ours, explicit, rtol=1e-4, atol=1e-5 * scale), path


def _planted(tuned_state: dict[str, torch.Tensor], k: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Add ``U_k diag(0.5) V_k^T`` (k equal singular values) to every encoder Linear weight; returns the plants."""
    plants = {}
    for key, w in tuned_state.items():
        if key.endswith(".weight") and w.dim() == 2 and ".encoder." in f".{key}":
            u = torch.linalg.qr(torch.randn(w.shape[0], k, generator=gen, dtype=torch.float64))[0]
            v = torch.linalg.qr(torch.randn(w.shape[1], k, generator=gen, dtype=torch.float64))[0]
            plant = 0.5 * u @ v.T
            w.add_(plant.to(w.dtype))
            plants[key] = plant
    return plants


@pytest.mark.parametrize("k", [1, 3])
def test_full_fine_tuning_path_recovers_a_planted_rank_k_difference(tmp_path, k):
    base = tiny_bert_model(seed=0)
    base.save_pretrained(tmp_path / "base")
    from transformers import BertForSequenceClassification

    tuned = BertForSequenceClassification(base.config)  # with a task head: 'bert.encoder...' vs the base's 'encoder...'
    tuned.bert.load_state_dict(base.state_dict())
    with torch.no_grad():
        plants = _planted(dict(tuned.bert.named_parameters()), k, torch.Generator().manual_seed(k))
    tuned.save_pretrained(tmp_path / "tuned")
    deltas = spectrum.model_deltas(str(tmp_path / "base"), str(tmp_path / "tuned"))
    names = {name for name, _ in deltas}
    assert names == {key[: -len(".weight")] for key in plants}  # no embeddings, no unchanged pooler, no head
    for rec in spectrum.spectra(deltas):
        assert rec["rank90"] == k and rec["numerical_rank"] == k, rec["layer"]
        assert rec["erank"] == pytest.approx(k, rel=1e-4)
        assert rec["singular_values"][0] == pytest.approx(0.5, rel=1e-5)
        assert rec["energy_top"]["1"] == pytest.approx(1 / k, rel=1e-6) and rec["energy_top"]["4"] == pytest.approx(1.0)


def test_cli_full_fine_tuning_writes_json_and_plot(tmp_path, capsys):
    base = tiny_bert_model(seed=0)
    base.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        _planted(dict(base.named_parameters()), 2, torch.Generator().manual_seed(0))
    base.save_pretrained(tmp_path / "tuned")
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    code = main(["inspect", "--spectrum", "--base-model", str(tmp_path / "base"), "--tuned-model", str(tmp_path / "tuned"),
                 "--layers", "attention", "--json", str(out), "--plot", str(png)])
    assert code == 0
    text = capsys.readouterr().out
    assert "rank90" in text and "mean rank90 2.0" in text
    data = json.loads(out.read_text())
    (entry,) = data["spectra"]
    assert entry["summary"]["layers"] == 2 * 4  # query, key, value, attention.output.dense per layer
    assert all(layer["rank90"] == 2 for layer in entry["layers"])
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_plot_titles_name_each_source(tmp_path, monkeypatch):
    import matplotlib.axes

    titles = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, text, **kw: titles.append(text))
    records = [spectrum.layer_spectrum(f"layer{i}", torch.randn(6, 5)) for i in range(3)]
    spectrum.plot({"run-a": records, "run-b": records[:1]}, tmp_path / "p.png")
    assert [t.split("\n")[0] for t in titles] == ["run-a", "run-b"]


def test_cli_spectrum_of_a_saved_minilm_lora_adapter(tmp_path, minilm_path, capsys):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    model = dt.wrap(base, dt.LoraConfig(r=4, alpha=8, init="random", targets=["query", "value"]))
    model.save(str(tmp_path / "adapter"))
    out = tmp_path / "s.json"
    assert main(["inspect", str(tmp_path / "adapter"), "--spectrum", "--model", minilm_path, "--json", str(out)]) == 0
    layers = json.loads(out.read_text())["spectra"][0]["layers"]
    assert len(layers) == 12 and {layer["shape"][0] for layer in layers} == {384}
    assert all(layer["numerical_rank"] == 4 for layer in layers)
    assert "12 layers" in capsys.readouterr().out


def test_cli_spectrum_errors(tmp_path, capsys):
    assert main(["inspect", "--spectrum", "--base-model", "minilm"]) == 2
    assert "go together" in capsys.readouterr().err
    assert main(["inspect", "--json", str(tmp_path / "x.json"), str(tmp_path)]) == 2
    assert main(["inspect", "--spectrum"]) == 2


def test_cli_spectrum_of_a_full_fine_tuning_run_folder(tmp_path, minilm_path, capsys):
    """A baseline run folder (trained tensors under the model's own keys): dW = trained - freshly loaded base."""
    from transformers import AutoModelForSequenceClassification

    from deltatune.train.artifacts import save_trained

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    with torch.no_grad():
        weights = {n: p for n, p in model.named_parameters() if n.endswith("attention.self.query.weight")}
        _planted({f".encoder.{n}": p for n, p in weights.items()}, 2, torch.Generator().manual_seed(0))
    save_trained(model, tmp_path / "run", "full", {"task": "classification", "labels": 2, "base_model": minilm_path})
    out = tmp_path / "s.json"
    assert main(["inspect", str(tmp_path / "run"), "--spectrum", "--json", str(out)]) == 0
    layers = json.loads(out.read_text())["spectra"][0]["layers"]
    assert [layer["layer"] for layer in layers] == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(6)]
    assert all(layer["rank90"] == 2 and layer["numerical_rank"] == 2 for layer in layers)
    assert "6 layers" in capsys.readouterr().out
