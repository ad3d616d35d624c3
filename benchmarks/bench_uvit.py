"""L2C on U-ViT at H/2 depth (28 + 1 blocks, 258 tokens), CPU: executed MACs vs ideal vs measured speedup.

A random U-ViT of U-ViT-H/2's depth and token count (narrower, so that it runs on a CPU) samples with
DPM-Solver++(2S) and CFG 1.4 (the reference's scale 0.4) uncached and with the published routers
(``--router-dir``: the ``ckpt`` folder of horseee/learning-to-cache's U-ViT; the files are not shipped)
at the reference's threshold. Timing: one warm-up, then interleaved repeats, medians.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_uvit.py --router-dir /tmp/ref-uvit/U-ViT/ckpt \\
        --nfe 50 --repeats 2 --out benchmarks/results/uvit_bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests/helpers.py builds the random U-ViT

import stepcache  # noqa: E402
from stepcache.cli.common import environment  # noqa: E402
from stepcache.policies.l2c import load_router  # noqa: E402
from stepcache.policies.l2c_dpm import staged_active_units  # noqa: E402
from stepcache.sampling.precision import synchronize  # noqa: E402
from tests.helpers import tiny_uvit  # noqa: E402


def timed(model, z, y, steps, policy):
    synchronize(z.device)
    start = time.perf_counter()
    out, stats = stepcache.sample(model, z, y, num_steps=steps, sampler="dpm-solver++2s", cfg_scale=1.4,
                                  policy=policy, return_stats=True)
    synchronize(z.device)
    return out, stats, time.perf_counter() - start


def bench(model, z, y, nfe: int, router: Path, threshold: float, repeats: int) -> dict:
    steps = nfe // 2
    policy = stepcache.L2C.from_checkpoint(router, threshold=threshold)
    base_out, base_stats, _ = timed(model, z, y, steps, stepcache.NoCache())  # warm-up
    base_t, cached_t = [], []
    for _ in range(repeats):
        base_t.append(timed(model, z, y, steps, stepcache.NoCache())[2])
        out, stats, t = timed(model, z, y, steps, policy)
        cached_t.append(t)
    units = staged_active_units(load_router(router)[0], threshold)
    measured = statistics.median(base_t) / statistics.median(cached_t)
    rel = float((out - base_out).norm() / base_out.norm())
    return {"router": router.name, "nfe": nfe, "threshold": threshold,
            "cache_step_units_active": units["active"], "cache_step_units_total": units["total"],
            "cache_step_units_removed_pct": round(100 * units["skipped_share"], 2),
            "all_units_run": (steps + 1) * 2 * len(model.blocks) + units["active"],  # full evaluations + cache steps
            "all_units_total": nfe * 2 * len(model.blocks),
            "macs_uncached_G": base_stats.macs_executed / 1e9, "macs_executed_G": stats.macs_executed / 1e9,
            "ideal_speedup": stats.ideal_speedup, "measured_speedup": measured,
            "measured_over_ideal": measured / stats.ideal_speedup,
            "baseline_s": statistics.median(base_t), "cached_s": statistics.median(cached_t),
            "baseline_all_s": base_t, "cached_all_s": cached_t, "relative_l2_change_of_latents": rel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--router-dir", type=Path, required=True, help="folder with dpm20_router.pth / dpm50_router.pth")
    ap.add_argument("--embed-dim", type=int, default=128, help="width (1152 for the real U-ViT-H/2)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--n", type=int, default=1, help="samples (x2 rows with CFG)")
    ap.add_argument("--nfe", type=int, nargs="+", default=[50], choices=(20, 50), help="(default: %(default)s)")
    ap.add_argument("--threshold", type=float, default=0.9, help="(default: %(default)s, the reference's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/uvit_bench.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = tiny_uvit(depth=28, embed_dim=args.embed_dim, heads=args.heads, img_size=32, num_classes=1001, seed=0)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(args.n, 4, 32, 32, generator=g)
    y = torch.randint(0, 1000, (args.n,), generator=g)
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "model": {"blocks": len(model.blocks), "embed_dim": args.embed_dim, "heads": args.heads,
                        "tokens": model.num_tokens, "weights": "random (tests.helpers.tiny_uvit, seed 0)"},
              "sampler": "dpm-solver++2s", "cfg_scale": 1.4, "n": args.n, "repeats": args.repeats,
              "threads": args.threads, "env": environment(), "results": []}
    for nfe in args.nfe:
        row = bench(model, z, y, nfe, args.router_dir / f"dpm{nfe}_router.pth", args.threshold, args.repeats)
        record["results"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("all_s")}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
