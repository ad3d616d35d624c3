"""``stepcache demo``: no cache vs FORA, ToCa, L2C, TaylorSeer and Forecast on the embedded digits DiT."""

from __future__ import annotations

import argparse
from pathlib import Path

from stepcache.cli.common import add_device_options, add_sampling_options, positive_int


def add_parser(sub) -> None:
    from stepcache.models.embedded import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS

    p = sub.add_parser("demo", help="compare caching methods on the embedded digits model",
                       description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("demo_out"), help="where the PNGs and tables go")
    p.add_argument("--num-samples", type=positive_int, default=20, help="digits per method (labels 0..9 in turn)")
    add_sampling_options(p, steps=DEFAULT_STEPS, sampler=DEFAULT_SAMPLER, cfg=DEFAULT_CFG, item="image")
    p.add_argument("--repeats", type=positive_int, default=1, help="timed runs per method (median)")
    p.add_argument("--policies", nargs="+", default=None, metavar="SPEC",
                   help="policy specs, e.g. fora:interval=3 'toca:interval=3,fresh_ratio=0.1' l2c "
                        "(default: one setting of each of FORA, ToCa, L2C)")
    p.add_argument("--no-progress", action="store_true", help="hide the per-step progress bars")
    add_device_options(p)
    from stepcache.cli.bench import add_policy_file_options

    add_policy_file_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from stepcache.bench.demo import DEMO_SPECS, run_demo
    from stepcache.bench.records import markdown_table
    from stepcache.bench.runner import RunSettings

    from stepcache.cli.bench import _check_specs, with_policy_file
    from stepcache.cli.common import check_output_dir, placement

    if args.policy is not None or args.force:
        args.policies = with_policy_file(args.policies or DEMO_SPECS, args)
    if args.policies:
        _check_specs(args.policies)
    device, dtype = placement(args)  # before anything is written
    check_output_dir(args.out_dir)
    settings = RunSettings(num_samples=args.num_samples, seed=args.seed, num_steps=args.num_sampling_steps,
                           sampler=args.sampler, cfg_scale=args.cfg_scale, warmup=1, repeats=args.repeats)
    result = run_demo(args.out_dir, settings, tuple(args.policies or DEMO_SPECS), progress=not args.no_progress,
                      device=device, dtype=dtype)
    print()
    print(markdown_table(result["records"]), end="")
    for name, path in result["files"].items():
        print(f"{name}: {path}")
    return 0
