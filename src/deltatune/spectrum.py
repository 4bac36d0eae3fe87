"""The spectrum of weight updates: singular values and effective rank of each layer's ``dW``.

The LoRA paper's hypothesis is that task updates have a low "intrinsic rank". For an adapter, ``dW`` is the delta's
own ``delta_weight`` (``s B A`` for LoRA; the equivalent dense update for DoRA and MoRA); for full fine-tuning it is
``W_tuned - W_base`` per weight matrix. For each ``dW`` (conv kernels flattened to [out, in * k...]) with singular
values ``s_1 >= s_2 >= ...`` (float64) we report:

- ``rank90``: the smallest k with ``sum_{i<=k} s_i^2 >= 0.9 * sum_i s_i^2`` (k directions hold 90% of the energy);
- ``erank``: the entropy effective rank of Roy & Vetterli (2007), ``exp(-sum p_i log p_i)`` with ``p_i = s_i / sum s``;
- ``numerical_rank``: how many ``s_i > tol * s_1`` (tol 1e-6 by default);
- ``energy_top[k]``: the fraction of the energy in the top k directions (how much a rank-k update could capture).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

HEAD_NAMES = re.compile(r"(^|\.)(classifier|score|lm_head|qa_outputs)(\.|$)")


def singular_values(dw: torch.Tensor) -> torch.Tensor:
    """Singular values (float64, descending) of ``dw`` viewed as [dim 0, rest]."""
    return torch.linalg.svdvals(dw.detach().double().flatten(1))


def energy_rank(s: torch.Tensor, fraction: float = 0.9) -> int:
    """Smallest k whose top-k singular values hold ``fraction`` of the squared Frobenius norm (0 for dW = 0)."""
    energy = s.double() ** 2
    total = energy.sum()
    if total <= 0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    return int((cumulative < fraction - 1e-12).sum().item()) + 1


def entropy_rank(s: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(H(p))``, ``p = s / sum(s)`` (0 for dW = 0)."""
    s = s.double()
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()).item())


def energy_top(s: torch.Tensor, ks: tuple[int, ...] = (1, 4, 8, 16, 32)) -> dict[str, float]:
    """Fraction of the energy ``sum s_i^2`` held by the top k directions, for each k (how well rank k captures dW)."""
    energy = s.double() ** 2
    total = float(energy.sum())
    return {str(k): (float(energy[:k].sum()) / total if total > 0 else 0.0) for k in ks}


def layer_spectrum(name: str, dw: torch.Tensor, tol: float = 1e-6) -> dict[str, Any]:
    """One layer's record: shape, norms, the three ranks, and the singular values."""
    s = singular_values(dw)
    top = float(s[0]) if s.numel() else 0.0
    return {
        "layer": name, "shape": list(dw.shape), "fro_norm": float(torch.linalg.vector_norm(s)), "top_sv": top,
        "rank90": energy_rank(s), "erank": entropy_rank(s),
        "numerical_rank": int((s > tol * top).sum().item()) if top > 0 else 0,
        "max_rank": min(dw.shape[0], math.prod(dw.shape[1:])), "energy_top": energy_top(s),
        "singular_values": s.tolist(),
    }


# ---- where the dW come from --------------------------------------------------------------------------------------
def adapter_deltas(model: nn.Module, adapter: str | None = None) -> Iterable[tuple[str, torch.Tensor]]:
    """(layer path, dW) for every mergeable delta of ``adapter`` (default: the active one) in a ``DeltaModel``."""
    from .layers import DeltaLayer
    from .methods.base import MergeableDelta

    name = adapter or model.active_adapter
    found = False
    for path, host in model.hosts():
        if isinstance(host, DeltaLayer) and name in host.adapters:
            delta = host.adapters[name]
            if not isinstance(delta, MergeableDelta):
                raise ConfigError(f"adapter '{name}' at '{path}' ({type(delta).__name__}) is not a weight update; "
                                  "--spectrum needs a mergeable method (LoRA, DoRA, AsyLoRA, MoRA)")
            if name in host.merged:
                raise ConfigError(f"adapter '{name}' is merged into '{path}'; unmerge it first")
            found = True
            with torch.no_grad():
                yield path, delta.delta_weight(host)
    if not found:
        raise ConfigError(f"adapter '{name}' has no weight-update layers; --spectrum needs LoRA, DoRA, AsyLoRA or MoRA")


def weight_deltas(
    base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], pattern: str | None = None
) -> Iterable[tuple[str, torch.Tensor]]:
    """(module path, W_tuned - W_base) for every ``*.weight`` with >= 2 dims present in both state dicts with the
    same shape that changed, excluding embeddings and task heads (new, randomly initialised), or only those matching
    ``pattern``."""
    regex = re.compile(pattern) if pattern else None
    for key in sorted(tuned):
        if not key.endswith(".weight") or key not in base or tuned[key].dim() < 2:
            continue
        if tuned[key].shape != base[key].shape or not tuned[key].is_floating_point():
            continue
        path = key[: -len(".weight")]
        if regex is not None:
            if not regex.search(path):
                continue
        elif HEAD_NAMES.search(path) or "embed" in path:
            continue
        dw = tuned[key].detach().double() - base[key].detach().double()
        if dw.any():  # unchanged weights (frozen in a last-layers run) are not updates
            yield path, dw


def _state_dict(name: str) -> dict[str, torch.Tensor]:
    """The backbone weights of a HF model folder (or 'minilm'), heads dropped, so that a base model and a checkpoint
    saved with a task head (``bert.encoder...`` vs ``encoder...``) line up key by key."""
    from transformers import AutoModel

    from .train.models import quiet_transformers, resolve_model

    quiet_transformers()
    return AutoModel.from_pretrained(resolve_model(name)).state_dict()


def model_deltas(base: str, tuned: str, pattern: str | None = None) -> list[tuple[str, torch.Tensor]]:
    """``W_tuned - W_base`` for two HF model folders (full fine-tuning exported with ``save_pretrained``)."""
    return list(weight_deltas(_state_dict(base), _state_dict(tuned), pattern))


def run_deltas(directory: Path, model: str | None = None, pattern: str | None = None) -> list[tuple[str, torch.Tensor]]:
    """dW of a run or adapter folder: the adapter's ``delta_weight`` per layer, or for a baseline run (full /
    last-layers) the trained tensors minus the base model's, which is loaded as the run loaded it."""
    from safetensors.torch import load_file

    from .model import DeltaModel
    from .train.artifacts import BASELINE_WEIGHTS, artifact_kind
    from .train.inference import artifact_info, load_for_inference

    if artifact_kind(directory) == "adapter":
        loaded, _, _, _ = load_for_inference(model, directory, None, None)
        if not isinstance(loaded, DeltaModel):
            raise ConfigError(f"{directory} did not load as an adapter")
        return list(adapter_deltas(loaded))
    info = artifact_info(directory)
    base, _, _, _ = load_for_inference(model or info.get("model"), None, info.get("task"), info.get("labels"))
    return list(weight_deltas(base.state_dict(), load_file(str(directory / BASELINE_WEIGHTS)), pattern))


def spectra(deltas: Iterable[tuple[str, torch.Tensor]], pattern: str | None = None, tol: float = 1e-6) -> list[dict[str, Any]]:
    regex = re.compile(pattern) if pattern else None
    return [layer_spectrum(name, dw, tol) for name, dw in deltas if regex is None or regex.search(name)]


def summary(records: list[dict[str, Any]]) -> dict[str, float]:
    n = len(records)
    if not n:
        return {"layers": 0}
    return {"layers": n, "mean_rank90": sum(r["rank90"] for r in records) / n,
            "mean_erank": sum(r["erank"] for r in records) / n,
            "mean_energy_top8": sum(r["energy_top"]["8"] for r in records) / n,
            "mean_rank90_fraction": sum(r["rank90"] / r["max_rank"] for r in records) / n}


def format_table(records: list[dict[str, Any]]) -> str:
    lines = [f"{'layer':<52} {'shape':>11} {'|dW|_F':>9} {'rank90':>6} {'erank':>7} {'num.rank':>8} {'top8':>6}"]
    for r in records:
        shape = "x".join(str(d) for d in r["shape"])
        lines.append(f"{r['layer'][-52:]:<52} {shape:>11} {r['fro_norm']:9.3g} {r['rank90']:6d} {r['erank']:7.1f} "
                     f"{r['numerical_rank']:8d} {100 * r['energy_top']['8']:5.1f}%")
    s = summary(records)
    if records:
        lines.append(f"{s['layers']} layers: mean rank90 {s['mean_rank90']:.1f} ({100 * s['mean_rank90_fraction']:.1f}% of "
                     f"full rank), mean erank {s['mean_erank']:.1f}, top-8 directions hold {100 * s['mean_energy_top8']:.1f}% "
                     "of the energy")
    return "\n".join(lines)


def write_json(entries: list[dict[str, Any]], path: Path) -> None:
    """``{"spectra": [{"source", "summary", "layers": [layer records]}, ...]}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"spectra": entries}, indent=1) + "\n", encoding="utf-8")


def plot(groups: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> None:
    """One panel per group: each layer's singular values divided by its largest, log y, against index."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), squeeze=False, sharey=True)
    for ax, (label, records) in zip(axes[0], groups.items()):
        cmap = plt.get_cmap("viridis")
        for i, r in enumerate(records):
            s = torch.tensor(r["singular_values"])
            if not s.numel() or s[0] <= 0:
                continue
            legend = r["layer"] if i in (0, len(records) - 1) else None  # colour runs first (dark) -> last (yellow)
            ax.plot(range(1, s.numel() + 1), (s / s[0]).clamp_min(1e-12).tolist(),
                    color=cmap(i / max(1, len(records) - 1)), lw=0.9, alpha=0.8, label=legend)
        ranks = summary(records)
        extra = f"\nmean rank90 {ranks['mean_rank90']:.1f}, erank {ranks['mean_erank']:.1f}" if records else ""
        ax.set_title(f"{label}{extra}", fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("singular value index")
        ax.grid(alpha=0.3)
        if records:
            ax.legend(fontsize=7, loc="lower left")
    axes[0][0].set_ylabel("s_i / s_1 (one line per layer)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["adapter_deltas", "energy_rank", "energy_top", "entropy_rank", "format_table", "layer_spectrum", "model_deltas", "plot",
           "run_deltas", "singular_values", "spectra", "summary", "weight_deltas", "write_json"]
