"""ToCa on OpenSora's geometry, on the CPU: uncached vs ToCa's OpenSora variant on a random STDiT3 with the
real block structure (28 spatial + 28 temporal blocks) and the 240p 9:16 51-frame token grid (15 latent frames
of 30 x 53 latents: 15 x 27 patches, S = 405, N = 6,075 tokens per row), scaled down in width to fit the CPU.

Reports executed multiply-adds (the runtime's accounting, and the spec's compute model of STDiT3-XL/2: 2.349x
at 240p), the measured wall-clock speedup (median of per-round ratios, methods taking turns in every round),
and the cache memory held at the end of a run (cached site outputs, per-token cross-attention entropy,
counters).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_opensora.py --out benchmarks/results/opensora.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import stepcache  # noqa: E402
from stepcache.adapters.stdit3 import stdit3_macs  # noqa: E402
from stepcache.bench.records import environment  # noqa: E402
from stepcache.models.stdit3 import STDiT3  # noqa: E402
from stepcache.policies.toca_opensora import ideal_speedup  # noqa: E402
from tests.stdit3_helpers import randomize_stdit3  # noqa: E402

LATENT = (4, 15, 30, 53)  # 240p 9:16, 51 frames
SIZES = dict(height=240.0, width=426.0, num_frames=51.0, fps=24.0)


def cache_bytes(handle) -> dict:
    """Bytes held by the run's cache: site outputs in the runtime's store, and the handler's maps/counters."""
    store = sum(t.numel() * t.element_size() for t in handle.store.values())
    handler = handle.handler
    maps = sum(t.numel() * t.element_size() for t in getattr(handler, "entropy", {}).values())
    counters = sum(t.numel() * t.element_size() for t in getattr(handler, "counters", {}).values() if t is not None)
    return {"outputs": store, "cross_entropy": maps, "counters": counters}


def timed(model, z, y, mask, steps: int, policy):
    """(latents, stats, wall seconds, CPU seconds of this process, cache bytes at the end of the run)."""
    memory = {}
    with stepcache.apply(model, policy) as handle:
        end_run = handle.end_run

        def record_then_end():
            memory.update(cache_bytes(handle))
            end_run()

        handle.end_run = record_then_end
        start, cpu = time.perf_counter(), time.process_time()
        out, stats = stepcache.sample(model, z, y, num_steps=steps, sampler="rflow", cfg_scale=7.0, mask=mask,
                                      return_stats=True, **SIZES)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return out, stats, seconds, cpu, memory


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-heads", type=int, default=2)
    parser.add_argument("--text-len", type=int, default=100, help="T5 tokens per prompt (the spec's model: 100)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = randomize_stdit3(STDiT3(depth=28, hidden_size=args.hidden_size, num_heads=args.num_heads,
                                    caption_channels=64, model_max_length=max(args.text_len, 1),
                                    enable_flash_attn=True), 0)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, *LATENT, generator=g)
    y = torch.randn(1, 1, model.model_max_length, 64, generator=g)
    mask = torch.ones(1, model.model_max_length, dtype=torch.long)
    methods = {"none": stepcache.NoCache(), "toca": stepcache.ToCa()}
    seconds = {name: [] for name in methods}
    cpu_seconds = {name: [] for name in methods}
    results = {}
    for _ in range(args.rounds):
        for name, policy in methods.items():
            out, stats, s, cpu, memory = timed(model, z, y, mask, args.steps, policy)
            seconds[name].append(s)
            cpu_seconds[name].append(cpu)
            results[name] = {"latents": out, "stats": stats, "memory": memory}
            print(f"{name}: {s:.1f} s wall, {cpu:.1f} s CPU, ideal {stats.ideal_speedup:.3f}x", flush=True)
    base, toca = results["none"], results["toca"]
    T, Hp, Wp = model.grid(z)
    with torch.device("meta"):
        xl = STDiT3.from_preset("STDiT3-XL/2").config
    spec_model = ideal_speedup(stdit3_macs(xl, T, Hp, Wp, args.text_len), 28, args.steps, T * Hp * Wp,
                               stepcache.ToCa(), embeddings=False)
    ratios = [a / b for a, b in zip(seconds["none"], seconds["toca"])]
    cpu_ratios = [a / b for a, b in zip(cpu_seconds["none"], cpu_seconds["toca"])]
    diff = (toca["latents"] - base["latents"]).abs().max() / base["latents"].abs().max()
    record = {
        "model": dict(depth=28, hidden_size=args.hidden_size, num_heads=args.num_heads, text_len=args.text_len,
                      latent=LATENT, tokens_per_row=T * Hp * Wp, steps=args.steps, **SIZES),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "measured_speedup": statistics.median(ratios),
        "measured_speedup_cpu_time": statistics.median(cpu_ratios),
        "ideal_speedup_runtime": toca["stats"].ideal_speedup,
        "macs_executed": {k: v["stats"].macs_executed for k, v in results.items()},
        "macs_uncached": toca["stats"].macs_uncached,
        "spec_compute_model_xl": spec_model,
        "measured_over_ideal": statistics.median(ratios) / toca["stats"].ideal_speedup,
        "measured_cpu_time_over_ideal": statistics.median(cpu_ratios) / toca["stats"].ideal_speedup,
        "cache_bytes": toca["memory"],
        "cache_bytes_if_xl_bf16": xl_cache_bytes(T * Hp * Wp, args.text_len),
        "relative_difference_vs_uncached": float(diff),
        "environment": environment(),
    }
    print(json.dumps({k: v for k, v in record.items() if k != "environment"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
    return 0


def xl_cache_bytes(num_tokens: int, text_len: int, rows: int = 2) -> dict:
    """The same cache for STDiT3-XL/2 in bf16, batch 1 with CFG (the spec: ~18.5 GB of outputs at 480p)."""
    blocks, D = 56, 1152
    return {"outputs": 3 * blocks * rows * num_tokens * D * 2, "cross_entropy": blocks * num_tokens * 4,
            "counters": 2 * blocks * rows * num_tokens * 4}


if __name__ == "__main__":
    raise SystemExit(main())
