"""FORA vs no cache on DiT-S/2 geometry (256 tokens), 2 labels with CFG, CPU.

Reports the measured wall-clock speedup, the ideal speedup from MACs, and their ratio. Timings are
interleaved (baseline, cached, baseline, ...) after a warm-up, and the median of the repeats is used.

    .venv/bin/python benchmarks/bench_fora.py --repeats 5 --out benchmarks/results/fora.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import stepcache
from stepcache.cli.common import environment, randomize_
from stepcache.sampling.precision import synchronize


def timed(model, z, y, steps, sampler, policy):
    torch.manual_seed(1)
    synchronize(z.device)
    start = time.perf_counter()
    _, stats = stepcache.sample(model, z, y, steps, sampler, 1.5, policy or stepcache.NoCache(), return_stats=True)
    synchronize(z.device)
    return time.perf_counter() - start, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--interval", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samplers", nargs="+", default=["ddpm", "ddim"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fora.json"))
    args = ap.parse_args()

    model = stepcache.DiT.from_preset("DiT-S/2", input_size=32)
    randomize_(model, 0)
    model.eval()
    torch.manual_seed(0)
    z = torch.randn(2, 4, 32, 32)
    y = torch.tensor([207, 360])
    rows = []
    for sampler in args.samplers:
        policy = stepcache.FORA(args.interval)
        timed(model, z, y, 5, sampler, None)  # warm-up
        timed(model, z, y, 5, sampler, policy)
        base_t, fora_t = [], []
        for _ in range(args.repeats):
            t, base_stats = timed(model, z, y, args.steps, sampler, None)
            base_t.append(t)
            t, stats = timed(model, z, y, args.steps, sampler, policy)
            fora_t.append(t)
        measured = statistics.median(base_t) / statistics.median(fora_t)
        row = {"sampler": sampler, "steps": args.steps, "interval": args.interval,
               "baseline_s": statistics.median(base_t), "fora_s": statistics.median(fora_t),
               "baseline_all_s": base_t, "fora_all_s": fora_t,
               "mac_ratio": stats.mac_ratio, "ideal_speedup": stats.ideal_speedup, "measured_speedup": measured,
               "measured_over_ideal": measured / stats.ideal_speedup}
        rows.append(row)
        print(f"{sampler}-{args.steps} FORA N={args.interval}: no cache {row['baseline_s']:.2f} s, "
              f"FORA {row['fora_s']:.2f} s, measured {measured:.2f}x, ideal {stats.ideal_speedup:.2f}x, "
              f"ratio {row['measured_over_ideal']:.3f}")
    record = {"benchmark": "fora", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "model": "DiT-S/2 geometry (random weights), 256 tokens, batch 2 labels x CFG",
              "environment": environment(), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
