"""The gated adds of one FORA reuse step on DiT-S/2 geometry, two ways: ``mul`` into a buffer then ``add_``
(stepcache's default lean path: the reference's two roundings) against one ``addcmul_`` (``handle.lean =
"fused"``: one pass fewer, one rounding).

24 adds (12 blocks x attention and MLP) of cached (4, 256, 384) float32 outputs into the residual stream,
with a 64 MiB write between repetitions so that the caches come from memory, as in a sampling step; the
median over ``--repeats`` of each, alternated, and the largest difference of the two results.

    .venv/bin/python benchmarks/bench_gated_add.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    caches = [torch.randn(4, 256, 384, generator=gen) for _ in range(24)]  # (B, T, D) each
    gates = [torch.randn(4, 1, 384, generator=gen) for _ in range(24)]  # (B, 1, D)
    x0 = torch.randn(4, 256, 384, generator=gen)
    scratch = torch.empty_like(x0)
    evict = torch.zeros(64 * 2**20 // 4)

    def two_pass(x):
        for a, g in zip(caches, gates):
            x.add_(torch.mul(g, a, out=scratch))
        return x

    def fused(x):
        for a, g in zip(caches, gates):
            x.addcmul_(g, a)
        return x

    times = {"mul + add_": [], "addcmul_": []}
    for _ in range(args.repeats):
        for name, fn in (("mul + add_", two_pass), ("addcmul_", fused)):
            evict.add_(1.0)
            x = x0.clone()
            start = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - start)
    result = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    diff = (two_pass(x0.clone()) - fused(x0.clone())).abs().max().item()
    for name, ms in result.items():
        print(f"{name:12s} {ms:.3f} ms per reuse step (24 gated adds, median of {args.repeats})")
    print(f"addcmul_ / (mul + add_): {result['addcmul_'] / result['mul + add_']:.3f}; max |difference| {diff:.2e}")
    return {"ms": result, "max_abs_diff": diff}


if __name__ == "__main__":
    main()
