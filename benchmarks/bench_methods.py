"""Every caching method on DiT-S/2 geometry (256 tokens, width 384, depth 12), random weights, CPU:
measured wall-clock speedup against the ideal one from executed MACs (forecast arithmetic and
indicators counted as work).

2 labels with CFG (4 rows), DDIM-50 by default. MagCache and TeaCache are calibrated on this model
first (``stepcache.training.calibrate``: magnitude ratios, TeaCache polynomial). Timings: a warm-up
of every policy, then ``--repeats`` rounds in which the baseline and every policy take turns; the
speedup is the median over rounds of (baseline time / policy time) of the same round.

    .venv/bin/python benchmarks/bench_methods.py --repeats 5 --out benchmarks/results/methods_dit_s2.json
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
from stepcache.bench.methods import build_policy
from stepcache.bench.records import environment
from stepcache.cli.common import randomize_
from stepcache.core.policy import PolicyConfig
from stepcache.sampling.precision import synchronize

SPECS = ("fora:interval=3", "taylorseer:interval=3,order=1", "taylorseer:interval=3,order=2",
         "forecast:num_full=17,power=0.7,order=2", "fbcache:threshold=0.2", "dbcache:front=1,threshold=0.2,warmup=4",
         "magcache:threshold=0.3", "teacache:threshold=0.3")


def timed(model, z, y, args, policy):
    torch.manual_seed(1)
    synchronize(z.device)
    start = time.perf_counter()
    _, stats = stepcache.sample(model, z, y, args.steps, args.sampler, 1.5, policy, return_stats=True)
    synchronize(z.device)
    return time.perf_counter() - start, stats


def calibrated(model, z, y, args) -> dict:
    from stepcache.training.calibrate import calibrate

    found = calibrate(model, lambda: stepcache.sample(model, z, y, args.steps, args.sampler, 1.5))
    return {"magcache": {"mag_ratios": tuple(found["mag_ratios"])},
            "teacache": {"coefficients": tuple(found["teacache_coefficients"])}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--specs", nargs="+", default=list(SPECS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/methods_dit_s2.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = stepcache.DiT.from_preset("DiT-S/2", input_size=32)
    randomize_(model, 0)
    model.eval()
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([207, 360])
    extra = calibrated(model, z, y, args)
    policies = {}
    for spec in args.specs:
        cfg = build_policy(spec, args.steps, args.sampler, embedded=False)
        d = cfg.to_dict()
        d.update(extra.get(d["method"], {}))
        policies[spec] = PolicyConfig.from_dict(d)
    base_policy = stepcache.NoCache()
    for policy in [base_policy, *policies.values()]:  # warm-up
        timed(model, z, y, argparse.Namespace(steps=10, sampler=args.sampler), policy)
    times = {spec: [] for spec in ["none", *policies]}
    stats = {}
    for _ in range(args.repeats):
        t, _ = timed(model, z, y, args, base_policy)
        times["none"].append(t)
        for spec, policy in policies.items():
            t, stats[spec] = timed(model, z, y, args, policy)
            times[spec].append(t)
    rows = []
    for spec in policies:
        ratios = [b / t for b, t in zip(times["none"], times[spec])]
        measured, ideal = statistics.median(ratios), stats[spec].ideal_speedup
        rows.append({"policy": spec, "mac_ratio": stats[spec].mac_ratio, "ideal_speedup": ideal,
                     "measured_speedup": measured, "measured_over_ideal": measured / ideal,
                     "median_s": statistics.median(times[spec]), "all_s": times[spec],
                     "policy_macs": stats[spec].macs_policy, "step_kinds": stats[spec].kind_counts()})
        print(f"{spec:45s} compute {stats[spec].mac_ratio:.3f}  ideal {ideal:.2f}x  measured {measured:.2f}x  "
              f"ratio {measured / ideal:.3f}", flush=True)
    record = {"benchmark": "methods on DiT-S/2 geometry",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "benchmarks/bench_methods.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                   vars(args).items() if k != "specs"),
              "model": "DiT-S/2 geometry (random weights), 256 tokens, 2 labels x CFG",
              "baseline_median_s": statistics.median(times["none"]), "baseline_all_s": times["none"],
              "environment": environment(), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
