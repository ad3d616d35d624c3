"""``stepcache sample``: DiT's sample.py with caching — a PNG grid and a JSON record.

With a cache method the same seeds are also sampled without cache (unless --no-baseline), so the
record holds the measured speedup next to the ideal one from MACs, and the fidelity (PSNR).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from stepcache.cli.policy_flags import check_fits
from stepcache.cli.common import (add_cache_options, add_device_options, build_policy, check_guidance_and_interval,
                                  check_output_dir, decode_latents, environment, finite_float, load_model, place,
                                  placement, positive_int, save_grid, seed_int, synchronize, to_uint8, write_json)
from stepcache.cli.sample_video import add_video_options, is_video_model
from stepcache.cli.sample_video import run as run_video
from stepcache.errors import ConfigError
from stepcache.io import atomic_write

DIT_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="sample class-conditional images, optionally cached",
                       description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-XL/2", help="DiT preset (DiT-XL/2, DiT-S/4, ...), U-ViT preset "
                   "(U-ViT-H/2, ...; with --ckpt), STDiT3-XL/2 (OpenSora v1.2 video, see the video options) or "
                   "'embedded' (default: %(default)s)")
    p.add_argument("--ckpt", default=None, help="checkpoint file (.pt or .safetensors); default: the official one")
    p.add_argument("--random-weights", action="store_true", help="random weights (timing only, no checkpoint)")
    p.add_argument("--image-size", type=int, choices=(256, 512), default=256, help="(default: %(default)s)")
    p.add_argument("--vae", default="ema", help="DiT: SD VAE variant, ema or mse (default: %(default)s); STDiT3: a "
                   "diffusers AutoencoderKL folder or hub id, decoded per latent frame into a video")
    p.add_argument("--sampler", choices=("ddpm", "ddim", "dpm-solver++2s"), default=None,
                   help="dpm-solver++2s: 2 model calls per step (default: ddpm; ddim for the embedded model)")
    p.add_argument("--num-sampling-steps", type=positive_int, default=None,
                   help="(default: 250; 50 for the embedded model, 30 for STDiT3)")
    p.add_argument("--cfg-scale", type=finite_float, default=4.0, help="guidance scale, 1 = off (default: %(default)s)")
    p.add_argument("--guide-all-channels", action="store_true", help="guide all latent channels, not DiT's first 3")
    p.add_argument("--seed", type=seed_int, default=0, help="(default: %(default)s)")
    p.add_argument("--class-labels", type=int, nargs="+", default=None,
                   help="labels to sample (default: DiT's sample.py labels; digits 0..7 for the embedded model)")
    p.add_argument("--out-dir", type=Path, default=Path("samples"), help="(default: %(default)s)")
    p.add_argument("--no-baseline", action="store_true", help="do not also run uncached for speedup/fidelity")
    add_device_options(p)
    add_cache_options(p)
    add_video_options(p)
    p.set_defaults(func=run)


def _validate(args, model) -> None:
    if args.class_labels is None:
        args.class_labels = list(range(8)) if args.model == "embedded" else DIT_LABELS
    if not 0 <= min(args.class_labels) <= max(args.class_labels) < model.num_classes:
        raise ConfigError(f"class labels must lie in 0..{model.num_classes - 1}, got {args.class_labels}.")
    check_guidance_and_interval(args)


def _timed_sample(model, noise, labels, args, policy):
    import stepcache

    torch.manual_seed(args.seed)  # per-step noise comes from the global RNG, as in DiT
    synchronize(noise.device)
    start = time.perf_counter()
    latents, stats = stepcache.sample(
        model, noise, labels, num_steps=args.num_sampling_steps, sampler=args.sampler, cfg_scale=args.cfg_scale,
        policy=policy or stepcache.NoCache(), guide_channels="all" if args.guide_all_channels else None,
        progress=True, return_stats=True)
    synchronize(noise.device)
    return latents.float().cpu(), stats, time.perf_counter() - start


def run(args) -> int:
    """Everything that can be refused is refused before the first sampling step (an uncached DiT-XL/2
    DDPM-250 baseline takes minutes): options, output folder, model, and the policy against the model."""
    if is_video_model(args.model):
        args.sampler = "rflow"  # OpenSora's rectified flow, whatever --sampler says (a policy file is checked on it)
        return run_video(args)
    if args.sampler is None or args.num_sampling_steps is None:  # not given: the model's own defaults
        from stepcache.models.embedded import DEFAULT_SAMPLER, DEFAULT_STEPS

        embedded = args.model == "embedded"
        args.sampler = args.sampler or (DEFAULT_SAMPLER if embedded else "ddpm")
        args.num_sampling_steps = args.num_sampling_steps or (DEFAULT_STEPS if embedded else 250)
    if args.vae not in ("ema", "mse"):
        raise ConfigError(f"--vae must be ema or mse for {args.model}, got {args.vae!r}.")
    check_guidance_and_interval(args)
    device, _ = placement(args)  # a device this machine lacks fails before anything is written or loaded
    check_output_dir(args.out_dir)
    build_policy(args)  # bad caching options fail before the model is loaded
    model, is_latent = load_model(args)
    _validate(args, model)
    policy = build_policy(args, model=model)
    check_fits(model, policy)
    model = place(model, args)
    torch.manual_seed(args.seed)
    labels = torch.tensor(args.class_labels)
    # drawn on the CPU (the same noise on every device), then moved; the sampler keeps float32 state
    noise = torch.randn(len(labels), model.in_channels, model.input_size, model.input_size)
    noise, labels = noise.to(device), labels.to(device)

    record = {"command": "sample", "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                              if k != "func"},
              "policy": policy.to_dict() if policy else {"method": "none"}, "environment": environment(),
              "device": str(device), "dtype": args.dtype}
    baseline = None
    if policy is not None and not args.no_baseline:
        base_latents, base_stats, base_time = _timed_sample(model, noise, labels, args, None)
        baseline = {"seconds": base_time, **{k: v for k, v in base_stats.as_dict().items() if k != "decisions"}}
    latents, stats, seconds = _timed_sample(model, noise, labels, args, policy)
    record["result"] = {"seconds": seconds, **stats.as_dict()}
    if baseline is not None:
        record["baseline"] = baseline
        record["result"]["measured_speedup"] = baseline["seconds"] / seconds
        mse = float(((latents - base_latents) ** 2).mean())
        record["result"]["latent_psnr_db"] = float("inf") if mse == 0 else 10 * torch.log10(
            torch.tensor(4.0 / mse)).item()

    method = args.cache.partition(":")[0]
    stem = f"{args.model.replace('/', '-')}-{args.sampler}{args.num_sampling_steps}-{method}-seed{args.seed}"
    images, why = (decode_latents(latents, args.vae) if is_latent else (latents, None))
    if images is None:
        latent_path = args.out_dir / f"{stem}.latents.pt"
        atomic_write(latent_path, lambda f: torch.save({"latents": latents, "labels": labels.cpu()}, f))
        print(f"Could not decode: {why}; saved the latents to {latent_path} instead of a PNG.")
        record["latents"] = str(latent_path)
    else:
        png = args.out_dir / f"{stem}.png"
        save_grid(to_uint8(images), png, nrow=min(8, len(labels)))
        record["image"] = str(png)
        print(f"Saved {png}")
    write_json(args.out_dir / f"{stem}.json", record)
    res = record["result"]
    line = f"{args.cache}: {seconds:.2f} s, {stats.summary()}"
    if "measured_speedup" in res:
        line += f"; measured speedup {res['measured_speedup']:.2f}x vs uncached {baseline['seconds']:.2f} s"
    print(line)
    return 0
