"""``stepcache bench``: sweep caching policies x settings; JSONL records, a markdown table, a Pareto plot."""

from __future__ import annotations

import argparse
from pathlib import Path

from stepcache.cli.common import add_device_options, add_sampling_options, check_output_dir, placement, positive_int

FORCE_HELP = ("re-measure every config even when its record is in --out (the old record is replaced), and run "
              "policy files tuned for another model, sampler or step count")


def _check_specs(specs) -> None:
    """A misspelt method must stop the run, not be skipped while the baseline alone is measured."""
    from stepcache.bench.methods import parse_spec, policy_file_spec
    from stepcache.errors import ConfigError
    from stepcache.core.policy import known_methods

    known = sorted(set(known_methods()) | {"none"})
    for spec in specs:
        method = parse_spec(spec)[0]
        if method not in known and policy_file_spec(spec) is None:  # a policy file is checked when loaded
            raise ConfigError(f"Unknown policy {method!r} in --policies {spec!r}; choose from {', '.join(known)}.")


def add_parser(sub) -> None:
    from stepcache.bench.sweep import DEFAULT_SPECS
    from stepcache.cli.policy_flags import add_cache_options
    from stepcache.models.embedded import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS

    p = sub.add_parser("bench", help="benchmark caching policies: time, MACs and quality",
                       description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="embedded", help="'embedded' or a native DiT checkpoint path / name")
    p.add_argument("--num-samples", type=positive_int, default=20, help="samples per run (labels k mod classes)")
    add_sampling_options(p, steps=DEFAULT_STEPS, sampler=DEFAULT_SAMPLER, cfg=DEFAULT_CFG, item="sample")
    p.add_argument("--warmup", type=int, default=1, help="short warm-up runs before timing")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="interleaved timing rounds (each runs the baseline and every policy once); the speedup is "
                        "the median of the per-round ratios")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out-dir", type=Path, default=Path("bench_out"), help="output folder: records, table, plot")
    p.add_argument("--out", type=Path, default=None, help="JSONL results file (default: <out-dir>/bench.jsonl)")
    p.add_argument("--report-dir", type=Path, default=None,
                   help="table + plot folder (default: --out-dir, or beside an explicit --out)")
    p.add_argument("--progress", action="store_true", help="show per-step progress bars")
    add_device_options(p)
    add_cache_options(p, many=True, default_specs=DEFAULT_SPECS, force_help=FORCE_HELP)
    p.set_defaults(func=run)


def paths(args) -> tuple[Path, Path]:
    """(records file, report folder): --out defaults under --out-dir; the reports go beside an explicit --out."""
    if args.out is not None:
        return args.out, args.report_dir or args.out.parent
    return args.out_dir / "bench.jsonl", args.report_dir or args.out_dir


def run(args) -> int:
    import torch

    from stepcache.bench.runner import RunSettings
    from stepcache.bench.sweep import load_model, runnable_specs, sweep, write_reports
    from stepcache.cli.policy_flags import requested_specs
    from stepcache.errors import ConfigError

    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}.")
    specs = requested_specs(args)
    _check_specs(specs)
    device, dtype = placement(args)  # before anything is written
    out, report_dir = paths(args)
    check_output_dir(report_dir, "--report-dir")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder, not a JSONL file.")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = RunSettings(num_samples=args.num_samples, seed=args.seed, num_steps=args.num_sampling_steps,
                           sampler=args.sampler, cfg_scale=args.cfg_scale, warmup=args.warmup, repeats=args.repeats)
    loaded = load_model(args.model, device, dtype)
    if not runnable_specs(specs, settings, loaded.embedded, log=lambda line: None):
        raise ConfigError(f"None of the policies {' '.join(specs)} can run on {args.model} with "
                          f"{args.sampler}-{args.num_sampling_steps}; nothing would be benchmarked but the baseline.")
    records = [r for r in sweep(loaded, specs, settings, out, progress=args.progress, force=args.force) if r]
    files = write_reports(records, report_dir, stem=out.stem,
                          title=f"{args.model}: {args.sampler}-{args.num_sampling_steps}")
    print(files["table"].read_text(), end="")
    print(f"records: {out}\ntable: {files['table']}\nplot: {files['plot']}")
    return 0
