"""Learn Forecast schedules for the embedded model (DDIM-50, CFG 4.0) and ship them as an asset.

For each number of full steps K, :func:`stepcache.training.forecast_schedule.learn_schedule` searches
the schedule with the best PSNR against the uncached samples of 8 calibration seeds (1000..1007,
disjoint from every benchmark's seeds 0..39), then the result is checked on 8 held-out seeds
(2000..2007). Writes ``src/stepcache/assets/forecast_schedules.json`` (atomic), which
``stepcache.policies.forecast.learned_schedule`` reads.

    .venv/bin/python scripts/learn_forecast_schedules.py --budgets 12 15 18 24
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import stepcache
from stepcache.bench.records import environment
from stepcache.eval.fidelity import psnr
from stepcache.io import write_json
from stepcache.models.embedded import load_embedded
from stepcache.policies.forecast import SCHEDULES_FILE
from stepcache.training.forecast_schedule import learn_schedule


def inputs(n: int, first_seed: int):
    noise = torch.stack([torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(first_seed + k))
                         for k in range(n)])  # (n, 1, 16, 16), image k from seed k
    return noise, torch.arange(n) % 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[12, 15, 18, 24], help="full steps K to learn")
    ap.add_argument("--order", type=int, default=2)
    ap.add_argument("--sweeps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=SCHEDULES_FILE)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_embedded()
    run = dict(num_steps=50, sampler="ddim", cfg_scale=4.0)
    cal, held = inputs(8, 1000), inputs(8, 2000)
    held_ref = stepcache.sample(model, *held, **run)
    table = json.loads(args.out.read_text()) if args.out.is_file() else {"schedules": {}}
    for K in args.budgets:
        start = time.time()
        found = learn_schedule(model, *cal, num_full=K, order=args.order, sweeps=args.sweeps, **run)
        out, stats = stepcache.sample(model, *held, policy=found.policy, return_stats=True, **run)
        held_psnr = float(psnr(out, held_ref).mean())
        key = f"embedded-ddim50-cfg4-K{K}"
        table["schedules"][key] = {"model": "embedded", "sampler": "ddim", "num_steps": 50, "cfg_scale": 4.0,
                                   "order": args.order, "full_steps": list(found.policy.full_steps),
                                   "calibration_psnr": round(found.psnr, 3), "held_out_psnr": round(held_psnr, 3),
                                   "mac_ratio": round(stats.mac_ratio, 4), "schedules_tried": len(found.tried),
                                   "seconds": round(time.time() - start, 1)}
        print(key, table["schedules"][key], flush=True)
        table.update(created=datetime.now(timezone.utc).isoformat(timespec="seconds"), environment=environment(),
                     command="scripts/learn_forecast_schedules.py " + " ".join(map(str, args.budgets)))
        write_json(args.out, table)


if __name__ == "__main__":
    main()
