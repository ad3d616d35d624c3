"""ToCa vs no cache on DiT-S/2 geometry (256 tokens), 2 labels with CFG 1.5, CPU (or GPU if asked).

Settings of the ToCa paper: DDIM-50 with N=3, DDPM-250 with N=4, fresh_ratio 0.07, the matching
schedule, staleness 0.25. For each sampler and score the script reports the MAC ratio (executed over
uncached), the ideal speedup from MACs, the measured wall-clock speedup (median of interleaved
repeats after a warm-up), their ratio (target >= 0.85), the share of MLP token evaluations, and the
peak memory the caches add (bytes of every tensor the runtime and the policy hold for the run, at
the run's end, when they are largest; plus the CUDA peak-allocation difference on a GPU).

    .venv/bin/python benchmarks/bench_toca.py --samplers ddim ddpm --repeats 5
    .venv/bin/python benchmarks/bench_toca.py --samplers ddim --steps 12 --repeats 1   # quick check
    .venv/bin/python benchmarks/bench_toca.py --quality --samplers ddim --threads 1   # adds "quality"
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import stepcache
from stepcache.cli.common import environment, randomize_

SETTINGS = {"ddim": (50, 3, "ToCa-ddim50"), "ddpm": (250, 4, "ToCa-ddpm250")}  # steps, N, schedule


def cache_bytes(handle) -> int:
    """Bytes of the cached branch outputs plus the policy's per-run tensors (scores, counters)."""
    tensors = [t for c in handle.state.calls.values() for t in c.store.values()]
    for attr in ("saved", "counters"):
        tensors += [t for t in getattr(handle.handler, attr, {}).values() if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def run(model, z, y, steps, sampler, policy, device):
    """(seconds, stats, cache bytes at the end of the run, CUDA peak bytes or None)."""
    handle = stepcache.apply(model, policy or stepcache.NoCache())
    seen = {}
    end_run = handle.end_run

    def record_then_free():
        seen["bytes"] = cache_bytes(handle)
        end_run()

    handle.end_run = record_then_free
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(1)
    try:
        start = time.perf_counter()
        _, stats = stepcache.sample(model, z, y, steps, sampler, 1.5, None, return_stats=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return seconds, stats, seen.get("bytes", 0), peak


def bench(model, z, y, sampler, score, args, device) -> dict:
    steps, interval, schedule = SETTINGS[sampler]
    steps = args.steps or steps
    policy = stepcache.ToCa(interval, args.fresh_ratio, schedule, score=score)
    run(model, z, y, 3, sampler, None, device)  # warm-up
    run(model, z, y, 3, sampler, policy, device)
    base_t, toca_t = [], []
    for _ in range(args.repeats):  # interleaved, so load changes hit both alike
        t, _, _, base_peak = run(model, z, y, steps, sampler, None, device)
        base_t.append(t)
        t, stats, nbytes, peak = run(model, z, y, steps, sampler, policy, device)
        toca_t.append(t)
    measured = statistics.median(base_t) / statistics.median(toca_t)
    return {
        "sampler": sampler, "steps": steps, "interval": interval, "schedule": schedule, "score": score,
        "fresh_ratio": args.fresh_ratio, "policy": policy.to_dict(),
        "baseline_s": statistics.median(base_t), "toca_s": statistics.median(toca_t),
        "baseline_all_s": base_t, "toca_all_s": toca_t,
        "mac_ratio": stats.mac_ratio, "ideal_speedup": stats.ideal_speedup, "measured_speedup": measured,
        "measured_over_ideal": measured / stats.ideal_speedup,
        "attn_share": stats.share_computed("attn"), "mlp_token_share": stats.share_computed("mlp"),
        "cache_bytes": nbytes, "cache_mib": nbytes / 2**20,
        "cuda_peak_added_bytes": None if peak is None else peak - base_peak,
    }


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Latent PSNR in dB with peak-to-peak 4 (latents live in about [-2, 2]), as ``stepcache sample``."""
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(16.0 / mse)


def quality_model() -> stepcache.DiT:
    """Tiny seeded DiT (depth 12, hidden 64, 64 tokens): DiT's Xavier init, and weights N(0, 0.05) in the
    layers DiT zero-initialises (adaLN, output) so that the blocks and the gates act."""
    torch.manual_seed(0)
    model = stepcache.DiT(input_size=16, patch_size=2, hidden_size=64, depth=12, num_heads=4, num_classes=10)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layers = [b.adaLN_modulation[-1] for b in model.blocks]
        layers += [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
        for layer in layers:
            layer.weight.normal_(0, 0.05, generator=g)
    return model.eval()


def quality(args) -> list[dict]:
    """Fidelity to the uncached latents (same noise, labels and RNG) of every score on a tiny random DiT:
    is the SDPA-compatible ``kv-norm`` as good as ``attention``? At the paper's settings, and at a
    constant 20 % recomputed share where the choice of tokens weighs more."""
    model = quality_model()
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(4, 4, 16, 16, generator=g), torch.tensor([0, 3, 5, 9])
    rows = []
    for sampler in args.samplers:
        steps, interval, schedule = SETTINGS[sampler]
        torch.manual_seed(1)
        base = stepcache.sample(model, z, y, steps, sampler, 1.5, None)
        policies = [("FORA", stepcache.FORA(interval)), ("ToCa R=0", stepcache.ToCa(interval, 0.0, schedule))]
        policies += [(f"{score} paper", stepcache.ToCa(interval, args.fresh_ratio, schedule, score=score))
                     for score in args.quality_scores]
        policies += [(f"{score} constant-0.2", stepcache.ToCa(interval, 0.2, "constant", score=score))
                     for score in args.quality_scores]
        for name, policy in policies:
            torch.manual_seed(1)
            lat, stats = stepcache.sample(model, z, y, steps, sampler, 1.5, policy, return_stats=True)
            rows.append({"sampler": sampler, "steps": steps, "policy": name, "config": policy.to_dict(),
                         "psnr_db": psnr(lat, base), "max_abs_err": float((lat - base).abs().max()),
                         "mac_ratio": stats.mac_ratio})
            print(f"quality {sampler}-{steps} {name}: latent PSNR {rows[-1]['psnr_db']:.3f} dB vs uncached, "
                  f"MACs {stats.mac_ratio:.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samplers", nargs="+", choices=sorted(SETTINGS), default=["ddim", "ddpm"])
    ap.add_argument("--scores", nargs="+", default=["attention", "kv-norm"],
                    help="ToCa scores to time (attention: explicit-softmax full steps; kv-norm: fused SDPA)")
    ap.add_argument("--fresh-ratio", type=float, default=0.07)
    ap.add_argument("--steps", type=int, default=None, help="override the number of steps (quick checks)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/toca.json"))
    ap.add_argument("--quality", action="store_true",
                    help="instead of timing, measure each score's fidelity to the uncached output on a tiny model")
    ap.add_argument("--quality-scores", nargs="+", default=["attention", "kv-norm", "norm", "random"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quality:  # stored under "quality" in the same JSON, keeping the timing results
        record = json.loads(args.out.read_text()) if args.out.exists() else {"benchmark": "toca"}
        record["quality"] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "model": "tiny random DiT (quality_model): depth 12, hidden 64, 4 heads, 64 tokens; "
                                      "4 labels x CFG 1.5", "results": quality(args)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))
        print(f"wrote {args.out}")
        return
    device = torch.device(args.device)

    model = stepcache.DiT.from_preset("DiT-S/2", input_size=32)
    randomize_(model, 0)
    model.eval().to(device)
    torch.manual_seed(0)
    z = torch.randn(2, 4, 32, 32, device=device)
    y = torch.tensor([207, 360], device=device)
    rows = []
    for sampler in args.samplers:
        for score in args.scores:
            row = bench(model, z, y, sampler, score, args, device)
            rows.append(row)
            print(f"{sampler}-{row['steps']} ToCa N={row['interval']} {score}: no cache {row['baseline_s']:.2f} s, "
                  f"ToCa {row['toca_s']:.2f} s, measured {row['measured_speedup']:.2f}x, "
                  f"ideal {row['ideal_speedup']:.2f}x (MACs {row['mac_ratio']:.3f}), "
                  f"ratio {row['measured_over_ideal']:.3f}, caches {row['cache_mib']:.1f} MiB")
    record = json.loads(args.out.read_text()) if args.out.exists() else {}
    record.update({"benchmark": "toca", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "model": "DiT-S/2 geometry (random weights, zero-init layers re-randomised), 256 tokens, "
                       "2 labels x CFG 1.5", "repeats": args.repeats, "threads": torch.get_num_threads(),
              "device": str(device), "environment": environment(), "results": rows})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
