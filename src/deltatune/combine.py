"""``add_weighted_adapter``: a new LoRA adapter from a weighted combination of existing ones (PEFT's API).

Every combination type is defined on the task vectors ``dW_i`` of the adapters: the dense weight update each one
makes to a layer, with its own scaling, rank pattern and rsLoRA rule applied (``delta.delta_weight``); a layer an
adapter does not target has ``dW_i = 0`` there. ``deltatune.task_vectors`` gives the rule of each type. The result
``T`` is then stored as a LoRA adapter (scaling 1 in effect on every layer):

* ``cat``: exactly, by concatenating factors: ``B = [B_1 .. B_n]``, ``A = [w_1 s_1 A_1; ..; w_n s_n A_n]``, so
  ``B A = sum_i w_i dW_i`` with rank ``sum_i r_i``. Only for deltas that are low-rank products (LoRA, rsLoRA,
  AsyLoRA: ``low_rank_factors``).
* every other type: the best rank-k approximation of ``T`` (truncated SVD, Eckart-Young), with k = ``svd_rank`` or
  the largest input rank at that layer; the achieved relative error ``||T - B A||_F / ||T||_F`` is reported per
  layer and overall. ``linear``/``ties``/... and ``svd``/``ties_svd``/... are the same combination here: PEFT's
  non-svd variants apply the rule to A and B separately, which adds cross terms; deltatune never does.

Non-additive deltas (DoRA) enter through their ``delta_weight``, which is the merged weight minus the base
(``m V / ||V|| - W0``): the combination is then ordinary task arithmetic on the merged weights, and the result
(a plain LoRA) reproduces it up to the reported error. Deltas that are not weight updates (prompts, prefixes,
bottleneck adapters) and adapters whose base was rewritten (PiSSA/OLoRA) or that train biases are refused.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .config import check_positive_int
from .dtypes import work_dtype
from .errors import ConfigError, MergeError
from .layers import DeltaLayer, TrainableCopies, layer_kind
from .methods.base import pattern_value
from .methods.lora import LoraConfig
from .methods.lora_init import PRINCIPAL_INITS
from .protocol import register_strategy
from .task_vectors import check_combination, combine_dense, truncated_svd

if TYPE_CHECKING:
    from .model import DeltaModel


@dataclass
class CombineReport:
    """What ``add_weighted_adapter`` built: the rank and relative Frobenius error ``||T - B A|| / ||T||`` of each
    layer, and the error over all layers together (``sqrt(sum ||T - B A||^2 / sum ||T||^2)``)."""

    adapter_name: str
    combination_type: str
    ranks: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    relative_error: float = 0.0

    def __str__(self) -> str:
        worst = max(self.errors.items(), key=lambda kv: kv[1], default=("-", 0.0))
        return (
            f"{self.adapter_name}: {self.combination_type} over {len(self.ranks)} layers, ranks "
            f"{min(self.ranks.values(), default=0)}-{max(self.ranks.values(), default=0)}, relative error "
            f"{self.relative_error:.3g} (worst layer {worst[0]}: {worst[1]:.3g})"
        )


def canonical(kind: str | None, delta_weight: torch.Tensor) -> torch.Tensor:
    """``dW`` (in the layout of the layer's weight) as the [out, in] matrix that LoRA's ``B A`` stands for."""
    if kind in ("conv1d_t", "embedding"):  # Conv1D weights are [in, out]; LoRA on embeddings builds dW^T
        return delta_weight.T
    if kind == "conv":
        return delta_weight.flatten(1)
    return delta_weight


def _refusal(model: DeltaModel, name: str) -> str | None:
    """Why adapter ``name`` cannot enter a combination, or None."""
    config = model.configs[name]
    if not config.mergeable:
        reason = config.unmergeable_reason
        return f"'{name}' ({type(config).__name__}) is not a weight update ({reason}), so it has no task vector"
    if getattr(config, "init", None) in PRINCIPAL_INITS:
        return (f"'{name}' was initialised with {config.init}, which rewrote the base weights; save it (it is "
                f"written as plain LoRA) and load it back, then combine")
    if getattr(config, "bias", "none") != "none":
        return (f"'{name}' trains biases (bias={config.bias!r}); they live in the base model and cannot be weighted "
                f"per adapter: combine adapters trained with bias='none'")
    return None


def check_request(
    model: DeltaModel, adapters: list[str], weights: list[float], adapter_name: str, svd_rank: int | None,
    combination_type: str,
) -> None:
    """Raise ``ConfigError``/``MergeError`` for anything that would make the combination wrong or impossible."""
    if not adapters or len(adapters) != len(weights):
        raise ConfigError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    unknown = [a for a in adapters if a not in model.configs]
    if unknown:
        raise ConfigError(f"no adapters named {unknown}; adapters: {', '.join(model.configs) or 'none'}")
    if len(set(adapters)) != len(adapters):
        raise ConfigError(f"adapters {adapters} lists one twice; give each adapter once with its total weight")
    if adapter_name in model.configs:
        raise ConfigError(f"adapter '{adapter_name}' already exists; delete_adapter('{adapter_name}') or pick another name")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
    if bad:
        raise ConfigError(f"weights must be finite numbers, got {bad}")
    if svd_rank is not None:
        check_positive_int("svd_rank (or None)", svd_rank)
    if svd_rank is not None and combination_type == "cat":
        raise ConfigError("svd_rank does not apply to 'cat' (its rank is the sum of the input ranks); use 'svd' to compress")
    reasons = [r for r in (_refusal(model, a) for a in adapters) if r]
    if reasons:
        raise ConfigError("cannot combine: " + "; ".join(reasons))
    if model.merged_adapters:
        raise MergeError(f"adapters {model.merged_adapters} are merged into the weights; call model.unmerge() first")


def _rank_at(model: DeltaModel, name: str, path: str, delta: torch.nn.Module) -> int:
    factors = delta.low_rank_factors()
    if factors is not None:
        return int(factors[1].shape[0])
    config = model.configs[name]
    rank = getattr(config, "r", None)
    if rank is not None and not isinstance(rank, bool) and isinstance(rank, int):
        rank = int(pattern_value(getattr(config, "rank_pattern", {}) or {}, path, rank))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:  # e.g. OFT sized by oft_block_size has r=0
        raise ConfigError(
            f"adapter '{name}' ({type(config).__name__}) has no rank to default to at {path}; pass svd_rank=K, the "
            f"rank of the LoRA fitted to the combined weight update"
        )
    return rank


def _cat_factors(
    host: DeltaLayer, members: list[tuple[str, float]], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B A = sum_i w_i s_i B_i A_i``, exactly (factors concatenated along the rank)."""
    bs, as_ = [], []
    for name, weight in members:
        delta = host.adapters[name]
        factors = delta.low_rank_factors()
        if factors is None:
            raise ConfigError(
                f"'cat' needs low-rank factors, but adapter '{name}' ({type(delta).__name__}) has a dense delta; "
                f"use combination_type='svd' (or 'linear') instead"
            )
        b, a = factors
        bs.append(b.detach().to(dtype))
        as_.append(a.detach().to(dtype) * (weight * delta.scaling))
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def _layer_result(
    model: DeltaModel, path: str, host: DeltaLayer, members: list[tuple[str, float]], request: dict,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(B, A, relative error, ||T||_F^2)`` for one layer."""
    kind = layer_kind(host)
    probe = next(iter(host.adapters[members[0][0]].parameters()))
    dtype = work_dtype(probe.dtype)
    if request["combination_type"] == "cat":
        b, a = _cat_factors(host, members, dtype)
        return b, a, 0.0, float((b.double() @ a.double()).square().sum())
    with torch.no_grad():
        tensors = [canonical(kind, host.adapters[n].delta_weight(host).detach().to(dtype)) for n, _ in members]
    target = combine_dense(
        tensors, [w for _, w in members], request["combination_type"], request["density"],
        request["majority_sign_method"], generator,
    )
    rank = request["svd_rank"] or max(_rank_at(model, n, path, host.adapters[n]) for n, _ in members)
    b, a, error = truncated_svd(target, rank)
    return b, a, error, float(target.double().square().sum())


def _result_config(model: DeltaModel, adapters: list[str], ranks: dict[str, int], saved: list[str]) -> LoraConfig:
    """A plain LoRA config with r = the largest rank, alpha = r, and ``rank_pattern`` (one exact, escaped module
    path per key, as PEFT matches them) for the layers of smaller rank; those layers' scaling r/r_l is folded into
    the stored A."""
    first = model.configs[adapters[0]]
    top = max(ranks.values())
    return LoraConfig(
        r=top, alpha=top, dropout=0.0, targets=sorted(ranks),
        rank_pattern={re.escape(p): r for p, r in sorted(ranks.items()) if r != top},
        modules_to_save=saved or None, base_model_name_or_path=first.base_model_name_or_path,
        task_type=first.task_type,
    )


def _saved_copies(model: DeltaModel, adapters: list[str], head_from: str | None) -> dict[str, str]:
    """modules_to_save path -> the adapter whose copy the result takes: the only one with a copy there (PEFT's
    rule), or ``head_from`` where several have one (whole modules such as task heads cannot be weighted)."""
    if head_from is not None and head_from not in adapters:
        raise ConfigError(f"modules_to_save_from={head_from!r} is not one of the combined adapters {adapters}")
    owners: dict[str, str] = {}
    for path, host in model.hosts():
        if isinstance(host, TrainableCopies):
            holders = [a for a in adapters if a in host.copies]
            if len(holders) > 1 and head_from not in holders:
                raise ConfigError(
                    f"adapters {holders} each train their own copy of '{path}' (modules_to_save); whole modules "
                    f"cannot be weighted: pass modules_to_save_from=<one of them> to take that adapter's copy"
                )
            if holders:
                owners[path] = head_from if head_from in holders else holders[0]
    return owners


def add_weighted_adapter(
    model: DeltaModel, adapters: list[str], weights: list[float], adapter_name: str,
    combination_type: str = "svd", svd_rank: int | None = None, density: float | None = None,
    majority_sign_method: str = "total", seed: int = 0, modules_to_save_from: str | None = None,
) -> CombineReport:
    """Add LoRA adapter ``adapter_name`` = the ``combination_type`` of ``adapters`` with ``weights`` (see the
    module docstring). The new adapter is inactive; on any error the model is left as it was. ``seed`` fixes
    DARE's random drops; ``modules_to_save_from`` names the adapter whose trained module copies (task heads) the
    result takes where several adapters have one."""
    weights = [float(w) if isinstance(w, numbers.Real) and not isinstance(w, bool) else w for w in weights]  # numpy too
    adapters = list(adapters)
    check_combination(combination_type, density, majority_sign_method)
    check_request(model, adapters, weights, adapter_name, svd_rank, combination_type)
    request = {"combination_type": combination_type, "density": density, "svd_rank": svd_rank,
               "majority_sign_method": majority_sign_method}
    generator = torch.Generator().manual_seed(seed)
    owners = _saved_copies(model, adapters, modules_to_save_from)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    report = CombineReport(adapter_name, combination_type)
    total = residual = 0.0
    for path, host in model.hosts():
        members = [(a, w) for a, w in zip(adapters, weights) if isinstance(host, DeltaLayer) and a in host.adapters]
        if not members:
            continue
        b, a, error, norm2 = _layer_result(model, path, host, members, request, generator)
        factors[path] = (b, a)
        report.ranks[path], report.errors[path] = a.shape[0], error
        total, residual = total + norm2, residual + error * error * norm2
    if not factors:
        raise ConfigError(f"adapters {adapters} adapt no layer with a weight update; nothing to combine")
    report.relative_error = math.sqrt(residual / total) if total > 0 else 0.0
    config = _result_config(model, adapters, report.ranks, sorted(owners))
    model.add_adapter(adapter_name, config)
    try:
        _fill(model, adapter_name, config, factors, owners)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise
    return report


@torch.no_grad()
def _fill(
    model: DeltaModel, name: str, config: LoraConfig, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    owners: dict[str, str],
) -> None:
    """Write the factors (A divided by the layer's scaling, so ``s B A`` is the target) and the copied modules."""
    hosts = dict(model.hosts())
    built = {p for p, h in hosts.items() if isinstance(h, DeltaLayer) and name in h.adapters}
    if built != set(factors):
        raise ConfigError(f"the combined targets resolved to other layers ({sorted(built ^ set(factors))[:3]}); "
                          f"this model has module paths that end with another module's path")
    for path, (b, a) in factors.items():
        live_b, live_a = hosts[path].adapters[name].low_rank_factors()
        live_b.copy_(b)
        live_a.copy_(a / config.scaling(path))
    for path, owner in owners.items():
        hosts[path].copies[name].load_state_dict(hosts[path].copies[owner].state_dict())


register_strategy("add_weighted_adapter", add_weighted_adapter)
