"""``stepcache bench``: sweep caching policies x settings; JSONL records, a markdown table, a Pareto plot."""

from __future__ import annotations

import argparse
from pathlib import Path

from stepcache.cli.common import add_device_options, add_sampling_options, check_output_dir, placement, positive_int


def _check_specs(specs) -> None:
    """A misspelt method must stop the run, not be skipped while the baseline alone is measured."""
    from stepcache.bench.methods import parse_spec
    from stepcache.errors import ConfigError
    from stepcache.core.policy import known_methods

    known = sorted(set(known_methods()) | {"none"})
    for spec in specs:
        method = parse_spec(spec)[0]
        if method not in known and not method.endswith(".json"):  # a policy file is checked when loaded
            raise ConfigError(f"Unknown policy {method!r} in --policies {spec!r}; choose from {', '.join(known)}.")


def add_policy_file_options(p) -> None:
    p.add_argument("--policy", type=Path, default=None, metavar="FILE",
                   help="also run a policy file written by `stepcache tune` (same as listing FILE in --policies)")
    p.add_argument("--force", action="store_true", help="run a policy file tuned for another model/sampler/steps")


def with_policy_file(specs, args) -> list:
    """``specs`` plus ``--policy FILE`` (and ``--force``) as a policy-file spec."""
    specs = list(specs or [])
    if args.policy is not None:
        specs.append(f"{args.policy}{':force=true' if args.force else ''}")
    elif args.force:
        specs = [s + ":force=true" if s.endswith(".json") else s for s in specs]
    return specs


def add_parser(sub) -> None:
    from stepcache.bench.sweep import DEFAULT_SPECS
    from stepcache.models.embedded import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS

    p = sub.add_parser("bench", help="benchmark caching policies: time, MACs and quality",
                       description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="embedded", help="'embedded' or a native DiT checkpoint path / name")
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_SPECS), metavar="SPEC",
                   help="policy specs method[:key=value,...]; the uncached baseline always runs")
    add_policy_file_options(p)
    p.add_argument("--num-samples", type=positive_int, default=20, help="samples per run (labels k mod classes)")
    add_sampling_options(p, steps=DEFAULT_STEPS, sampler=DEFAULT_SAMPLER, cfg=DEFAULT_CFG, item="sample")
    p.add_argument("--warmup", type=int, default=1, help="short warm-up runs before timing")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per config (median reported)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/bench.jsonl"), help="JSONL results file")
    p.add_argument("--report-dir", type=Path, default=None, help="table + plot folder (default: beside --out)")
    p.add_argument("--progress", action="store_true", help="show per-step progress bars")
    add_device_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from stepcache.bench.runner import RunSettings
    from stepcache.bench.sweep import load_model, runnable_specs, sweep, write_reports
    from stepcache.errors import ConfigError

    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}.")
    args.policies = with_policy_file(args.policies, args)
    _check_specs(args.policies)
    device, dtype = placement(args)  # before anything is written
    check_output_dir(args.report_dir or args.out.parent, "--report-dir")
    if args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder, not a JSONL file.")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = RunSettings(num_samples=args.num_samples, seed=args.seed, num_steps=args.num_sampling_steps,
                           sampler=args.sampler, cfg_scale=args.cfg_scale, warmup=args.warmup, repeats=args.repeats)
    loaded = load_model(args.model, device, dtype)
    if not runnable_specs(args.policies, settings, loaded.embedded, log=lambda line: None):
        raise ConfigError(f"None of the policies {' '.join(args.policies)} can run on {args.model} with "
                          f"{args.sampler}-{args.num_sampling_steps}; nothing would be benchmarked but the baseline.")
    records = [r for r in sweep(loaded, args.policies, settings, args.out, progress=args.progress) if r]
    files = write_reports(records, args.report_dir or args.out.parent, stem=args.out.stem,
                          title=f"{args.model}: {args.sampler}-{args.num_sampling_steps}")
    print(files["table"].read_text(), end="")
    print(f"records: {args.out}\ntable: {files['table']}\nplot: {files['plot']}")
    return 0
