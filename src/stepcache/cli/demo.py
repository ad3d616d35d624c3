"""``stepcache demo``: no cache vs FORA, ToCa, L2C, TaylorSeer and Forecast on the embedded digits DiT."""

from __future__ import annotations

import argparse
from pathlib import Path

from stepcache.cli.common import add_device_options, add_sampling_options, positive_int


def add_parser(sub) -> None:
    from stepcache.bench.demo import DEMO_SPECS
    from stepcache.cli.policy_flags import add_cache_options
    from stepcache.models.embedded import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS

    p = sub.add_parser("demo", help="compare caching methods on the embedded digits model",
                       description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("demo_out"), help="where the PNGs and tables go")
    p.add_argument("--num-samples", type=positive_int, default=20, help="digits per method (labels 0..9 in turn)")
    add_sampling_options(p, steps=DEFAULT_STEPS, sampler=DEFAULT_SAMPLER, cfg=DEFAULT_CFG, item="image")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="interleaved timing rounds (each runs every method once); the speedup is the median of "
                        "the per-round ratios")
    p.add_argument("--no-progress", action="store_true", help="hide the per-step progress bars")
    add_device_options(p)
    add_cache_options(p, many=True, default_specs=DEMO_SPECS,
                      force_help="run policy files tuned for another model, sampler or step count")
    p.set_defaults(func=run)


def run(args) -> int:
    from stepcache.bench.demo import run_demo
    from stepcache.bench.records import markdown_table
    from stepcache.bench.runner import RunSettings
    from stepcache.cli.bench import _check_specs
    from stepcache.cli.common import check_output_dir, placement
    from stepcache.cli.policy_flags import requested_specs

    specs = requested_specs(args)
    _check_specs(specs)
    device, dtype = placement(args)  # before anything is written
    check_output_dir(args.out_dir)
    settings = RunSettings(num_samples=args.num_samples, seed=args.seed, num_steps=args.num_sampling_steps,
                           sampler=args.sampler, cfg_scale=args.cfg_scale, warmup=1, repeats=args.repeats)
    result = run_demo(args.out_dir, settings, tuple(specs), progress=not args.no_progress, device=device, dtype=dtype)
    print()
    print(markdown_table(result["records"]), end="")
    for name, path in result["files"].items():
        print(f"{name}: {path}")
    return 0
