"""``stepcache calibrate``: record MagCache's magnitude ratios and fit TeaCache's polynomial for a model.

Samples without caching (one sample per run, seed + k for sample k), records per step the whole
stack's residual norm ratio and, where the model's adapter gives the first block's modulated input,
the (input change, output change) pairs TeaCache's polynomial is fitted to; writes one JSON file that
``MagCache(mag_ratios=FILE)`` and ``TeaCache(coefficients=FILE)`` load. Models: a native DiT
(``--model``, as ``stepcache sample``) or a diffusers pipeline saved in a local folder (``--pipeline``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from stepcache.cli.common import add_device_options, add_sampling_options, load_model, place, placement, positive_int
from stepcache.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="record MagCache ratios and fit TeaCache coefficients for a model",
                       description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="embedded", help="native DiT: 'embedded' or a preset such as DiT-XL/2")
    p.add_argument("--ckpt", default=None, help="native DiT checkpoint (.pt or .safetensors)")
    p.add_argument("--random-weights", action="store_true", help="native DiT with random weights (testing only)")
    p.add_argument("--image-size", type=int, choices=(256, 512), default=256, help="native DiT image size")
    p.add_argument("--pipeline", type=Path, default=None,
                   help="a diffusers pipeline folder (from save_pretrained), used instead of --model")
    p.add_argument("--prompt", nargs="+", default=["a photo of a cat", "a red car on a street"],
                   help="prompts for a text-to-image --pipeline (sample k uses prompt k mod their number)")
    p.add_argument("--num-samples", type=positive_int, default=8, help="calibration runs (one sample each)")
    add_sampling_options(p, steps=50, sampler="ddim", cfg=1.5, item="sample")
    p.add_argument("--out", type=Path, required=True, help="the calibration JSON to write")
    add_device_options(p)
    p.set_defaults(func=run)


def _native_runs(args):
    """(model, name, run_k) for a native DiT: sample k = label k mod classes, seed + k."""
    import stepcache

    if args.cfg_scale < 1:
        raise ConfigError(f"--cfg-scale must be >= 1, got {args.cfg_scale}.")
    device, _ = placement(args)
    model, _ = load_model(args)
    model = place(model, args)

    def run_k(k: int):
        g = torch.Generator().manual_seed(args.seed + k)
        noise = torch.randn(1, model.in_channels, model.input_size, model.input_size, generator=g)
        labels = torch.tensor([k % model.num_classes])
        # the CPU keeps drawing the steps' noise from g; another device needs a generator of its own
        steps_g = g if device.type == "cpu" else torch.Generator(device).manual_seed(args.seed + k)
        stepcache.sample(model, noise.to(device), labels.to(device), num_steps=args.num_sampling_steps,
                         sampler=args.sampler, cfg_scale=args.cfg_scale, generator=steps_g)

    return model, args.model, run_k


def _pipeline_runs(args):
    """(pipeline, name, run_k) for a local diffusers pipeline (no download)."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise ConfigError("--pipeline needs diffusers (pip install 'stepcache[diffusers]').") from None
    if not args.pipeline.is_dir():
        raise ConfigError(f"--pipeline {args.pipeline} is not a folder holding a saved diffusers pipeline.")
    device, dtype = placement(args)
    pipe = DiffusionPipeline.from_pretrained(str(args.pipeline), local_files_only=True).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    class_conditional = type(pipe).__name__.startswith("DiT")

    def run_k(k: int):
        g = torch.Generator().manual_seed(args.seed + k)
        common = dict(num_inference_steps=args.num_sampling_steps, generator=g, guidance_scale=args.cfg_scale)
        if class_conditional:
            pipe(class_labels=[k % 1000], output_type="np", **common)
        else:
            pipe(prompt=args.prompt[k % len(args.prompt)], output_type="latent", **common)

    return pipe, str(args.pipeline), run_k


def _check_out(out: Path) -> None:
    """Refuse an unusable --out before any sampling (minutes of work lost otherwise)."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the path of the JSON file to write.")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--out {out} cannot be written: {parent} is a file, not a folder.")


def run(args) -> int:
    from stepcache.training.calibrate import calibrate
    from stepcache.policies.calibrate_math import write_calibration

    _check_out(args.out)
    target, name, run_k = _pipeline_runs(args) if args.pipeline else _native_runs(args)
    counter = iter(range(args.num_samples))
    result = calibrate(target, lambda: run_k(next(counter)), repeats=args.num_samples)
    family = result.pop("family")
    record = write_calibration(args.out, model=name, family=family, num_steps=result["num_steps"],
                               mag_ratios=result["mag_ratios"], teacache_coefficients=result["teacache_coefficients"],
                               extra={"sampler": args.sampler, "cfg_scale": args.cfg_scale,
                                      "num_samples": args.num_samples, "teacache_r2": result["teacache_r2"],
                                      "teacache_pairs": result["pairs"]})
    print(f"MagCache ratios for {record['num_steps']} steps: " + ", ".join(f"{r:.4f}" for r in record["mag_ratios"]))
    if record.get("teacache_coefficients") is not None:
        print(f"TeaCache coefficients (x^4 .. 1): {record['teacache_coefficients']} "
              f"(R^2 {record['teacache_r2']:.3f} over {record['teacache_pairs']} step pairs)")
    else:
        print(f"TeaCache: {family} gives no modulated input to calibrate on; only MagCache ratios were recorded.")
    print(f"Wrote {args.out}: use MagCache(mag_ratios='{args.out}') or TeaCache(coefficients='{args.out}').")
    return 0
