"""Learning-to-Cache on the embedded digits DiT (or a random-weight DiT until it exists), CPU.

Trains a router (DDIM, the embedded model's default step count) with the paper's objective, or loads
one with --router, then samples the same seeds uncached and with caching, and reports: training
time, skipped share of cache-step units per threshold, measured wall-clock vs ideal (MAC) speedup,
and fidelity to the uncached output (PSNR/SSIM). Two references at equal skip count show what the
learning buys: the same number of units skipped at random places, and skipping every unit of every
cache step (FORA with interval 2 in the L2C phase). Timings: warm-up, then interleaved repeats, median.

    .venv/bin/python benchmarks/bench_l2c.py --iters 200 --ship     # writes the shipped router too
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
from stepcache.eval.fidelity import fidelity
from stepcache.sampling.precision import synchronize
from stepcache.policies.l2c import L2C, active_units, cache_steps, save_router
from stepcache.training.l2c_data import RouterData, load_data
from stepcache.training.l2c import RouterTrainConfig, model_identity, router_mse, train_router

ASSETS = Path(stepcache.__file__).resolve().parent / "assets"


def load_model(weights: Path | None = None):
    """(model, data, name, sampler, steps, cfg_scale): the embedded model if present, else a random DiT."""
    try:
        from stepcache.models import embedded

        model = embedded.load_embedded(path=weights)
        data = load_data("embedded", model, latent=False)
        name = "embedded" if weights is None else f"embedded:{weights}"
        return model, data, name, embedded.DEFAULT_SAMPLER, embedded.DEFAULT_STEPS, embedded.DEFAULT_CFG
    except (ImportError, stepcache.CheckpointError):
        model = stepcache.DiT(input_size=16, patch_size=2, in_channels=1, hidden_size=128, depth=8, num_heads=4,
                              num_classes=10, learn_sigma=False)
        randomize_(model, 0)
        g = torch.Generator().manual_seed(0)
        data = RouterData(torch.randn(256, 1, 16, 16, generator=g), torch.randint(0, 10, (256,), generator=g))
        return model.eval(), data, "random-DiT-8x128", "ddim", 50, 1.5


def random_router(like: torch.Tensor, skipped: int, seed: int) -> torch.Tensor:
    """Logits that skip ``skipped`` cache-step units at random places (+-5 logits)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.full_like(like, 5.0)
    slots = [(i, u) for i in cache_steps(like.shape[0]) for u in range(like.shape[1])]
    for k in torch.randperm(len(slots), generator=g)[:skipped].tolist():
        logits[slots[k]] = -5.0
    return logits


def run_sample(model, z, y, steps, sampler, cfg_scale, policy):
    synchronize(z.device)
    start = time.perf_counter()
    out, stats = stepcache.sample(model, z, y, steps, sampler, cfg_scale, policy or stepcache.NoCache(),
                                  generator=torch.Generator().manual_seed(1), return_stats=True)
    synchronize(z.device)
    return out, stats, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--router", type=Path, default=None, help="evaluate this router instead of training one")
    ap.add_argument("--weights", type=Path, default=None, help="embedded-model weights other than the shipped ones")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--lam", type=float, default=1e-4)
    ap.add_argument("--ste-threshold", type=float, default=None)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    ap.add_argument("--n", type=int, default=16, help="samples (x2 rows with CFG)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ship", action="store_true", help="also write stepcache/assets/embedded_router_ddim<S>")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/l2c.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, data, name, sampler, steps, cfg_scale = load_model(args.weights)
    record = {"date": datetime.now(timezone.utc).isoformat(), "model": name, "sampler": sampler, "steps": steps,
              "cfg_scale": cfg_scale, "args": {k: str(v) for k, v in vars(args).items()}, "env": environment()}
    if args.weights is not None:
        from stepcache.models.embedded import embedded_config

        record["weights_training"] = embedded_config(args.weights.with_suffix(".json")).get("training")
    tcfg = RouterTrainConfig(num_steps=steps, lam=args.lam, lr=args.lr, iters=args.iters, batch_size=args.batch_size,
                             ste_threshold=args.ste_threshold, threshold=args.thresholds[0],
                             checkpoint_every=max(1, args.iters // 4))
    if args.router is None:
        result = train_router(model, data, tcfg, checkpoint=args.out.with_suffix(".train.safetensors"),
                              model_name=name)
        logits = result.logits
        first = RouterTrainConfig(**{**tcfg.__dict__, "iters": 1})
        init = train_router(model, data, first, progress=False).logits
        record["training"] = {"seconds": result.seconds, "iters": args.iters, "batch_size": args.batch_size,
                              "lr": args.lr, "lambda": args.lam, "s_per_iter": result.seconds / max(1, args.iters),
                              "objective_mse_after_1_iter": router_mse(model, data, init, tcfg),
                              "objective_mse_trained": router_mse(model, data, logits, tcfg)}
        if args.ship and args.weights is None:
            path = ASSETS / f"embedded_router_ddim{steps}.safetensors"
            save_router(path, logits, model=model_identity(model, name), sampler=sampler, threshold=tcfg.threshold,
                        **{"lambda": args.lam}, lr=args.lr, iters=args.iters, batch_size=args.batch_size,
                        train_seconds=round(result.seconds, 1), cfg_scale=cfg_scale)
            record["shipped"] = str(path)
    else:
        logits = L2C.from_checkpoint(args.router).logits()

    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.n, model.in_channels, model.input_size, model.input_size, generator=g)
    y = torch.arange(args.n) % model.num_classes
    base, base_stats, _ = run_sample(model, z, y, steps, sampler, cfg_scale, None)
    rows = []
    for th in args.thresholds:
        units = active_units(logits, th)
        out, stats, _ = run_sample(model, z, y, steps, sampler, cfg_scale, L2C(logits, th))
        row = {"policy": f"l2c@{th}", "skipped_share": units["skipped_share"], "ideal_speedup": stats.ideal_speedup,
               **fidelity(out, base)}
        skipped = units["total"] - units["active"]
        rand = [fidelity(run_sample(model, z, y, steps, sampler, cfg_scale,
                                    L2C(random_router(logits, skipped, s), th))[0], base) for s in range(2)]
        row["random_same_count"] = {k: statistics.mean(r[k] for r in rand) for k in rand[0]}
        rows.append(row)
        print(json.dumps(row))
    allskip, stats, _ = run_sample(model, z, y, steps, sampler, cfg_scale, L2C(torch.full_like(logits, -5.0)))
    rows.append({"policy": "skip-all-cache-steps", "skipped_share": 1.0, "ideal_speedup": stats.ideal_speedup,
                 **fidelity(allskip, base)})
    print(json.dumps(rows[-1]))
    record["results"] = rows
    record["timing"] = timing(model, z, y, steps, sampler, cfg_scale, L2C(logits, args.thresholds[0]), args.repeats)
    print(json.dumps(record["timing"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


def timing(model, z, y, steps, sampler, cfg_scale, policy, repeats: int) -> dict:
    """Measured vs ideal speedup: warm-up, interleaved repeats, medians."""
    run_sample(model, z[:2], y[:2], 4 if steps % 2 == 0 else 5, sampler, cfg_scale, None)
    base_t, cached_t = [], []
    for _ in range(repeats):
        base_t.append(run_sample(model, z, y, steps, sampler, cfg_scale, None)[2])
        _, stats, t = run_sample(model, z, y, steps, sampler, cfg_scale, policy)
        cached_t.append(t)
    measured = statistics.median(base_t) / statistics.median(cached_t)
    return {"threshold": policy.threshold, "baseline_s": statistics.median(base_t),
            "cached_s": statistics.median(cached_t), "baseline_all_s": base_t, "cached_all_s": cached_t,
            "measured_speedup": measured, "ideal_speedup": stats.ideal_speedup,
            "measured_over_ideal": measured / stats.ideal_speedup}


if __name__ == "__main__":
    main()
