"""Micro-benchmarks behind the fused-op choices (one thread, CPU time per call, median of --iters):

* rank-r product layouts at MiniLM's shapes (4096 tokens, r = 8): ``g^T h`` vs ``(h^T g)^T`` (grad_B),
  ``g B`` vs ``(B^T g^T)^T`` (the [tokens, r] input-gradient factor), ``x A^T`` vs ``(A x^T)^T`` (h), next to the
  base layer's ``g W`` they ride along with;
* dropout masks per element: ``bernoulli_`` (bool), ``rand < p``, torch ``random_`` int32 bits, the seeded PCG64
  draw used by ``deltatune.ops.dropout`` (0/1 floats), and applying a mask: ``masked_fill`` vs ``x * bool`` vs
  ``x * float``.
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

from deltatune.ops.dropout import _from_seed

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
        "seeded PCG64 -> 0/1 float (deltatune)": lambda: _from_seed(12345, n, p, torch.float32),
        "apply: masked_fill": lambda: x.masked_fill(~keep_bool, 0.0),
        "apply: x * bool": lambda: x * keep_bool,
        "apply: x * float": lambda: x * keep_float,
    }
    for name, fn in masks.items():
        report["masks_ns_per_element"][name] = 1e6 * cpu_ms(fn, it) / n
    report["loadavg_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
