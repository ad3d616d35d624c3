"""``stepcache tune``: search every registered caching policy for a target; write the chosen one to --out.

    stepcache tune --model embedded --sampler ddim --num-sampling-steps 50 --target-speedup 3 --out policy.json

    stepcache tune --pipeline PixArt-alpha/PixArt-XL-2-512x512 --prompt "a red fox" --prompt ... \
        --num-inference-steps 20 --min-psnr 30 --out policy.json

With --pipeline the calibration set is the --prompt list (held-out: --heldout-prompt, else the last
third of the prompts); PSNR is measured on the decoded images. The records, the report (finalists on held-out
seeds, Pareto front) and the plot go to --out-dir
(default: a folder named after --out, beside it). Re-running the same command resumes from the records.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stepcache.cli.common import add_sampling_options, finite_float, positive_int


def add_parser(sub) -> None:
    from stepcache.models.embedded import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS

    p = sub.add_parser("tune", help="find the best caching policy for a target speedup or quality",
                       description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="embedded", help="'embedded' or a native DiT checkpoint path / name")
    add_sampling_options(p, steps=DEFAULT_STEPS, sampler=DEFAULT_SAMPLER, cfg=DEFAULT_CFG, item="calibration seed")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-speedup", type=float, help="best PSNR among policies at least this fast")
    goal.add_argument("--min-psnr", type=float, help="fastest policy with at least this PSNR (dB) vs uncached")
    goal.add_argument("--max-fd", type=float, help="fastest policy with at most this judge Fréchet distance "
                      "(embedded digits model)")
    p.add_argument("--speedup-basis", choices=("ideal", "measured"), default="ideal",
                   help="--target-speedup on the MACs ratio, or on the finalists' measured wall-clock speedup")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD", help="search only these methods")
    p.add_argument("--compare", nargs="+", default=[], metavar="SPEC",
                   help="hand-picked specs (method:key=value,...) measured beside the finalists")
    p.add_argument("--calibration-seeds", type=positive_int, default=16, help="seeds the search is judged on")
    p.add_argument("--held-out-seeds", type=positive_int, default=16, help="seeds the finalists are checked on")
    p.add_argument("--first-chunk", type=positive_int, default=2, help="seeds of the first rung")
    p.add_argument("--eta", type=int, default=3, help="successive halving keeps 1/eta per rung")
    p.add_argument("--finalists", type=positive_int, default=3, help="best candidates checked on held-out seeds")
    p.add_argument("--timing-repeats", type=int, default=3, help="interleaved timing rounds (0: no timing)")
    p.add_argument("--timing-seeds", type=positive_int, default=16, help="held-out seeds timed as one batch")
    pipe = p.add_argument_group("diffusers pipelines (instead of --model)")
    pipe.add_argument("--pipeline", default=None, metavar="ID_OR_FOLDER",
                      help="a diffusers pipeline (hub id or save_pretrained folder): PixArt, SD3, FLUX or DiT")
    pipe.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                      help="a calibration prompt (repeat; DiT: a class id or name)")
    pipe.add_argument("--heldout-prompt", action="append", default=[], metavar="TEXT",
                      help="a held-out prompt (repeat; none: the last third of the --prompt list)")
    pipe.add_argument("--num-inference-steps", dest="num_sampling_steps", type=positive_int, default=argparse.SUPPRESS,
                      metavar="N", help="the same as --num-sampling-steps")
    pipe.add_argument("--guidance-scale", type=finite_float, default=None,
                      help="the pipeline's guidance scale (None: its own)")
    pipe.add_argument("--height", type=positive_int, default=None, help="image height (None: the pipeline's)")
    pipe.add_argument("--width", type=positive_int, default=None, help="image width (None: the pipeline's)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("policy.json"), help="policy file to write")
    p.add_argument("--out-dir", type=Path, default=None, help="records, report and plot (default: <out>_tune/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from stepcache.cli.common import add_device_options

    add_device_options(p)
    from stepcache.cli.policy_flags import add_cache_options

    # the CLI's one policy syntax: --policies SPEC... and --cache METHOD --setting V add hand-picked comparisons
    add_cache_options(p, many=True, files=False)
    p.set_defaults(func=run)


def target_of(args):
    from stepcache.tune.search import Target

    if args.target_speedup is not None:
        return Target("speedup", args.target_speedup)
    if args.min_psnr is not None:
        return Target("psnr", args.min_psnr)
    return Target("fd", args.max_fd)


def run(args) -> int:
    import torch

    from stepcache.bench.sweep import load_model
    from stepcache.errors import ConfigError
    from stepcache.tune.evaluate import RunSpec
    from stepcache.tune.report import write_outputs
    from stepcache.tune.tuner import Tuner, TuneOptions

    from stepcache.cli.common import placement

    device, dtype = placement(args)  # before anything is loaded or written
    target = target_of(args)
    if args.cfg_scale < 1:
        raise ConfigError(f"--cfg-scale must be >= 1, got {args.cfg_scale}.")
    if args.max_fd is not None and (args.model != "embedded" or args.pipeline):
        raise ConfigError("--max-fd needs the digit judge, which scores only --model embedded.")
    if args.pipeline and args.model != "embedded":
        raise ConfigError("Give --model or --pipeline, not both.")
    if (args.prompt or args.heldout_prompt) and not args.pipeline:
        raise ConfigError("--prompt and --heldout-prompt go with --pipeline.")
    if args.methods:  # a misspelt method stops the run before anything is written
        from stepcache.cli.policy_flags import menu

        unknown = sorted(set(args.methods) - set(menu()))
        if unknown:
            raise ConfigError(f"Unknown cache method {unknown[0]!r}; known: {', '.join(menu()[1:])}.")
    from stepcache.cli.policy_flags import requested_specs

    args.compare = list(args.compare) + requested_specs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = args.out_dir or args.out.with_name(args.out.stem + "_tune")
    opts = TuneOptions(target, args.calibration_seeds, args.held_out_seeds, args.seed, args.first_chunk, args.eta,
                       finalists=args.finalists, timing_repeats=args.timing_repeats, timing_seeds=args.timing_seeds,
                       speedup_basis=args.speedup_basis, methods=tuple(args.methods) if args.methods else None,
                       compare=tuple(args.compare), progress=not args.no_progress)
    if args.pipeline:
        tuner, title = _pipeline_tuner(args, opts, out_dir, device, dtype)
    else:
        run_spec = RunSpec(args.sampler, args.num_sampling_steps, args.cfg_scale)
        loaded = load_model(args.model, device, dtype)
        tuner = Tuner(loaded.model, args.model, run_spec, opts, out_dir, judge=loaded.embedded)
        title = f"{args.model}, {args.sampler}-{args.num_sampling_steps}, cfg {args.cfg_scale:g}"
    result = tuner.tune()
    tuned_for = {"model": tuner.identity, "sampler": tuner.run.sampler, "num_steps": args.num_sampling_steps,
                 "cfg_scale": tuner.run.cfg_scale, "target": {**target.to_dict(), "basis": args.speedup_basis,
                                                              "searched": result["searched_target"].to_dict()}}
    if tuner.jobs is not None:  # the prompts it was judged on, and on what (decoded images)
        tuned_for["prompts"] = tuner.jobs.header()
    files = write_outputs(result, tuned_for, args.out, out_dir, title)
    chosen = result["chosen"]
    h, c = chosen["held_out"], chosen["calibration"]
    speed = chosen["measured_speedup"]
    print(f"chosen: {chosen['candidate'].label} ({result['why']})\n"
          f"calibration: {c.psnr:.2f} dB; held-out: {h.psnr:.2f} dB (gap {chosen['gap_db']:+.2f} dB), "
          f"SSIM {h.ssim:.4f}, ideal speedup {h.ideal_speedup:.2f}x"
          + (f", measured speedup {speed:.2f}x" if speed else ""))
    print(f"runs sampled now: {result['new_runs']} (+{result['reference_runs']} uncached references), "
          f"records reused: {result['resumed_records']}")
    print("\n".join(f"{name}: {path}" for name, path in files.items()))
    return 0


def _pipeline_tuner(args, opts, out_dir, device, dtype):
    """(Tuner, report title) of ``--pipeline``: the prompts are the seeds, the scheduler is the sampler."""
    from dataclasses import replace

    from stepcache.cli.generate import load_pipeline
    from stepcache.tune.evaluate import RunSpec
    from stepcache.tune.pipeline_eval import PipelineJobs, split_prompts
    from stepcache.tune.tuner import Tuner

    calibration, held_out = split_prompts(args.prompt, args.heldout_prompt)
    jobs = PipelineJobs(calibration, held_out, args.seed, args.height, args.width)
    # the tuner's seed k is job k: calibration jobs 0..n-1, held-out jobs after them
    opts = replace(opts, calibration_seeds=len(calibration), held_out_seeds=len(held_out), seed=0,
                   timing_seeds=min(opts.timing_seeds, len(held_out)))
    pipe = load_pipeline(args.pipeline, dtype, device)
    pipe.set_progress_bar_config(disable=True)
    run_spec = RunSpec(type(pipe.scheduler).__name__, args.num_sampling_steps, args.guidance_scale)
    tuner = Tuner(pipe, args.pipeline, run_spec, opts, out_dir, judge=False, jobs=jobs)
    guidance = "its default guidance" if args.guidance_scale is None else f"guidance {args.guidance_scale:g}"
    title = f"{type(pipe).__name__} {args.pipeline}, {run_spec.sampler}-{args.num_sampling_steps}, {guidance}"
    return tuner, title
