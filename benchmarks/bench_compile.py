"""torch.compile under a cache, CPU: eager vs compiled cached runs on DiT-S/2 geometry.

Every policy runs under four builds of the same random-weight model (adaLN re-randomised):
``eager``; ``regional`` (``stepcache.compile_blocks``: each block's branch work compiled, the cache
decisions in Python); ``whole`` (``torch.compile(model)`` of the cached model: the hooks graph-break,
so the branch work inside them stays eager); ``whole+regional`` (both). Each build is warmed up once per
policy (its compile time is reported apart: first run minus steady run), then timed in interleaved
rounds (every policy x build once per round); the median of the rounds is reported, with the graphs
dynamo built during the timed rounds (0: nothing recompiled) and after a run with another step count.

    .venv/bin/python benchmarks/bench_compile.py --rounds 3 --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import stepcache
from stepcache.cli.common import environment, randomize_

POLICIES = {"none": stepcache.NoCache, "fora": lambda: stepcache.FORA(3),
            "toca": lambda: stepcache.ToCa(3, 0.07, "ToCa-ddim50"),
            "taylorseer": lambda: stepcache.TaylorSeer()}
BUILDS = ("eager", "regional", "whole", "whole+regional")


def build(model, kind: str, options: dict):
    """A copy of ``model`` compiled the ``kind`` way."""
    m = copy.deepcopy(model)
    if kind in ("regional", "whole+regional"):
        stepcache.compile_blocks(m, **options)
    if kind in ("whole", "whole+regional"):
        m = torch.compile(m, **options)
    return m


def run(model, z, y, steps: int, policy):
    torch.manual_seed(1)
    start = time.perf_counter()
    out, stats = stepcache.sample(model, z, y, steps, "ddim", 1.5, policy(), return_stats=True)
    return time.perf_counter() - start, out, stats


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="DiT-S/2")
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px) (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--policies", nargs="+", default=["none", "fora", "toca"], choices=list(POLICIES))
    ap.add_argument("--builds", nargs="+", default=list(BUILDS), choices=BUILDS)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--mode", default=None, help="torch.compile mode (default: torch's default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {"backend": args.backend} | ({"mode": args.mode} if args.mode else {})

    base = stepcache.DiT.from_preset(args.preset, input_size=args.latent)
    randomize_(base, 0)
    base.eval()
    torch.manual_seed(0)
    z, y = torch.randn(1, 4, args.latent, args.latent), torch.tensor([207])
    models = {kind: build(base, kind, options) for kind in args.builds}

    compile_s, outputs, ideal = {}, {}, {}
    with torch.no_grad():
        for name in args.policies:  # warm-up: the first run of each build compiles
            for kind, m in models.items():
                first, out, stats = run(m, z, y, args.steps, POLICIES[name])
                again, _, _ = run(m, z, y, args.steps, POLICIES[name])
                compile_s[(name, kind)] = max(0.0, first - again)
                outputs[(name, kind)] = out
                ideal[name] = stats.ideal_speedup
        before = graphs()
        times = {key: [] for key in compile_s}
        for r in range(args.rounds):  # every other round in reverse build order: a drift within a round cancels
            for name in args.policies:
                for kind, m in (list(models.items()) if r % 2 == 0 else list(models.items())[::-1]):
                    times[(name, kind)].append(run(m, z, y, args.steps, POLICIES[name])[0])
        recompiled = graphs() - before
        before = graphs()
        for kind, m in models.items():  # another step count: may compile the step-count-free parts again?
            run(m, z, y, args.steps + 5, POLICIES[args.policies[-1]])
        new_steps = graphs() - before

    rows = []
    for (name, kind), ts in times.items():
        median = statistics.median(ts)
        eager = statistics.median(times[(name, "eager")]) if "eager" in models else None
        uncached = statistics.median(times[("none", "eager")]) if ("none", "eager") in times else None
        diff = (outputs[(name, kind)] - outputs[(name, "eager")]).abs().max().item() if "eager" in models else None
        per_round = [e / t for e, t in zip(times[(name, "eager")], ts)] if eager else None
        rows.append({"policy": name, "build": kind, "median_s": median, "runs_s": ts,
                     "compile_s": compile_s[(name, kind)],
                     # the median over rounds of (eager time / this build's time) of the same round
                     "speedup_vs_eager_same_policy": statistics.median(per_round) if eager else None,
                     "speedup_vs_eager_per_round": per_round,
                     "speedup_vs_eager_uncached": uncached / median if uncached else None,
                     "ideal_speedup": ideal[name], "max_abs_diff_vs_eager": diff})
    record = {"benchmark": "bench_compile", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "model": f"{args.preset} random weights (adaLN re-randomised), latent {args.latent}",
              "sampler": f"ddim-{args.steps}, 1 sample, CFG 1.5 (2 rows)", "compile_options": options,
              "rounds": args.rounds, "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
              "environment": environment(), "graphs_built_in_timed_rounds": recompiled,
              f"graphs_built_by_a_{args.steps + 5}_step_run": new_steps, "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "compile.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out_dir / "compile.md").write_text(markdown(record) + "\n")
    print(markdown(record))
    return record


def markdown(record: dict) -> str:
    lines = [f"# torch.compile under a cache ({record['date']})", "",
             (f"`{record['command']}`: {record['model']}, {record['sampler']}, compile {record['compile_options']}, "
              f"median of {record['rounds']} interleaved rounds (per-round ratios for 'vs eager, same policy'), "
              f"{record['threads']} threads, "
              f"load average {', '.join(f'{x:.1f}' for x in record['load_average'])} (a shared machine)."), "",
             (f"Graphs built during the timed rounds (recompilations): {record['graphs_built_in_timed_rounds']}; "
              + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in record.items() if k.startswith("graphs_built_by"))),
             "", ("| policy | build | median s | vs eager, same policy | vs eager uncached | ideal (MACs) | "
                  "compile s | max abs diff vs eager |"), "|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['policy']} | {r['build']} | {r['median_s']:.2f} | "
                     f"{_x(r['speedup_vs_eager_same_policy'])} | "
                     f"{_x(r['speedup_vs_eager_uncached'])} | {r['ideal_speedup']:.2f}x | {r['compile_s']:.1f} | "
                     f"{r['max_abs_diff_vs_eager']:.1e} |")
    return "\n".join(lines)


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


if __name__ == "__main__":
    main()
