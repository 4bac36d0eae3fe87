"""Micro-benchmarks behind the fused-op choices (one thread, CPU time per call, median of --iters):

* rank-r product layouts at MiniLM's shapes (4096 tokens, r = 8): ``g^T h`` vs ``(h^T g)^T`` (grad_B),
  ``g B`` vs ``(B^T g^T)^T`` (the [tokens, r] input-gradient factor), ``x A^T`` vs ``(A x^T)^T`` (h), next to the
  base layer's ``g W`` they ride along with;
* dropout masks per element: ``bernoulli_`` (bool), ``rand < p``, torch ``random_`` int32 bits, the seeded PCG64
  draw used by ``deltatune.ops.dropout`` (0/1 floats), and applying a mask: ``masked_fill`` vs ``x * bool`` vs
  ``x * float``;
* the LoRA overhead budget of one MiniLM 32x128 training step, linear by linear: forward + backward of
  ``deltatune.ops.lora_linear`` (r 8, dropout 0 and 0.1) minus that of the frozen ``F.linear`` alone (input
  requiring grad, as in the floor), times the number of such linears in MiniLM (24 of 384->384, 6 of 384->1536,
  6 of 1536->384; the pooler reads 32 rows and is left out), with the share of the dropout mask (draw in
  forward, unpack of its packed bits in backward). Compared with the floor's step time this says how close to the floor any
  implementation of these ops can get.
Results: benchmarks/results/bench_ops.json.

    .venv/bin/python benchmarks/bench_ops.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from deltatune.ops import lora_linear
from deltatune.ops.dropout import KeepStream, as_values, draw_keep, unpack_keep

RESULTS = Path(__file__).resolve().parent / "results" / "bench_ops.json"


def cpu_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * statistics.median(times)


def layouts(tokens: int, n_in: int, n_out: int, r: int, it: int) -> dict[str, float]:
    x, g = torch.randn(tokens, n_in), torch.randn(tokens, n_out)
    w, a, b = torch.randn(n_out, n_in), torch.randn(r, n_in), torch.randn(n_out, r)
    h = torch.randn(tokens, r)
    return {
        "base g W": cpu_ms(lambda: g @ w, it),
        "grad_B g^T h": cpu_ms(lambda: g.T @ h, it), "grad_B (h^T g)^T": cpu_ms(lambda: (h.T @ g).T, it),
        "gB: g B": cpu_ms(lambda: g @ b, it), "gB: (B^T g^T)^T": cpu_ms(lambda: (b.T @ g.T).T, it),
        "h: x A^T": cpu_ms(lambda: x @ a.T, it), "h: (A x^T)^T": cpu_ms(lambda: (a @ x.T).T, it),
    }


MINILM_LINEARS = {(384, 384): 24, (384, 1536): 6, (1536, 384): 6}  # per step: q,k,v,attn.out; intermediate; output


def fwd_bwd(fn, x: torch.Tensor, g: torch.Tensor, params: tuple[torch.Tensor, ...]):
    def step() -> None:
        for t in (x, *params):
            t.grad = None
        fn().backward(g)
    return step


def shape_costs(tokens: int, n_in: int, n_out: int, r: int, it: int) -> dict[str, float]:
    """ms per forward+backward call at one shape: frozen base alone, LoRA d0 and d0.1, and the mask work in it
    (the draw in forward, the unpack in backward)."""
    x = torch.randn(tokens, n_in, requires_grad=True)
    g = torch.randn(tokens, n_out)
    w, b = torch.randn(n_out, n_in) / n_in**0.5, torch.randn(n_out)
    a = (torch.randn(r, n_in) / n_in**0.5).requires_grad_()
    bb = (torch.randn(n_out, r) * 0.01).requires_grad_()
    _, state = draw_keep(x, 0.1, torch.float32)
    return {
        "base": cpu_ms(fwd_bwd(lambda: torch.nn.functional.linear(x, w, b), x, g, ()), it),
        "lora_d0": cpu_ms(fwd_bwd(lambda: lora_linear(x, w, b, a, bb, 2.0, 0.0), x, g, (a, bb)), it),
        "lora_d0.1": cpu_ms(fwd_bwd(lambda: lora_linear(x, w, b, a, bb, 2.0, 0.1), x, g, (a, bb)), it),
        "mask_draw": cpu_ms(lambda: draw_keep(x, 0.1, torch.float32), it),
        "mask_unpack": cpu_ms(lambda: unpack_keep(state, x.numel(), torch.float32), it),
    }


def lora_overhead(tokens: int, r: int, it: int) -> dict:
    """Per MiniLM linear shape and summed over one step: base-only vs LoRA forward+backward (ms)."""
    shapes, total = {}, {"base": 0.0, "lora_d0": 0.0, "lora_d0.1": 0.0, "mask_draw": 0.0, "mask_unpack": 0.0}
    for (n_in, n_out), count in MINILM_LINEARS.items():
        row = shape_costs(tokens, n_in, n_out, r, it)
        shapes[f"{n_in}->{n_out} x{count}"] = row
        for key, value in row.items():
            total[key] += count * value
    per_step = {
        "base_linears_ms": total["base"],
        "extra_d0_ms": total["lora_d0"] - total["base"],
        "extra_d0.1_ms": total["lora_d0.1"] - total["base"],
        "mask_draw_ms": total["mask_draw"],
        "mask_unpack_ms": total["mask_unpack"],
    }
    return {"per_linear_ms": shapes, "per_step": per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokens, r, it = args.tokens, 8, args.iters
    report: dict = {"threads": 1, "tokens": tokens, "r": r, "loadavg_at_start": os.getloadavg(), "layouts_ms": {},
                    "masks_ns_per_element": {}}
    for n_in, n_out in ((384, 384), (384, 1536), (1536, 384)):
        report["layouts_ms"][f"{n_in}->{n_out}"] = layouts(tokens, n_in, n_out, r, it)
    x = torch.randn(tokens, 384)
    n, p = x.numel(), 0.1
    keep_bool, keep_float = torch.rand(x.shape) >= p, (torch.rand(x.shape) >= p).float()
    masks = {
        "bernoulli_ (bool)": lambda: torch.empty(x.shape, dtype=torch.bool).bernoulli_(p),
        "rand < p": lambda: torch.rand(x.shape) < p,
        "torch random_ int32": lambda: torch.empty(x.shape, dtype=torch.int32).random_(),
        "KeepStream (8-bit exact) -> 0/1 float (deltatune)":
            lambda: as_values(KeepStream(12345, p).draw(n), torch.float32),
        "apply: masked_fill": lambda: x.masked_fill(~keep_bool, 0.0),
        "apply: x * bool": lambda: x * keep_bool,
        "apply: x * float": lambda: x * keep_float,
    }
    for name, fn in masks.items():
        report["masks_ns_per_element"][name] = 1e6 * cpu_ms(fn, it) / n
    report["lora_overhead_minilm_32x128"] = lora_overhead(tokens, r, it)
    report["loadavg_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
