"""``stepcache sample-ddp``: DiT's sample_ddp.py for FID runs — per-image seeds, resumable, an ADM npz.

Run it under torchrun (``torchrun --nproc_per_node=K -m stepcache sample-ddp ...``; gloo on CPU, NCCL on GPU)
or as a single process. A killed run restarted with the same command finishes the missing samples and
ends with the same ``DIR/samples.npz`` as an uninterrupted run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from stepcache.cli.policy_flags import check_fits
from stepcache.cli.common import (add_cache_options, add_device_options, build_policy, check_guidance_and_interval,
                                  check_output_dir, environment, finite_float, placement, positive_int)
from stepcache.errors import CheckpointError, ConfigError
from stepcache.io import file_sha256


def global_seed(text: str) -> int:
    """A seed in 0..2**32-1: it is mixed as one 32-bit word, so 2**32 would silently repeat seed 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must lie in 0..2**32-1, got {value}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("sample-ddp", help="sample N images for FID on K processes (torchrun), resumable",
                       description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=positive_int, required=True, help="number of images N")
    p.add_argument("--out-dir", type=Path, required=True, help="folder for samples/, samples.npz and the record")
    p.add_argument("--per-proc-batch-size", type=positive_int, default=32, help="(default: %(default)s)")
    p.add_argument("--global-seed", type=global_seed, default=0, help="(default: %(default)s)")
    p.add_argument("--model", default="embedded", help="'embedded' (pixel-space digits DiT) or a DiT preset such "
                   "as DiT-XL/2 (latent, decoded with the SD VAE) (default: %(default)s)")
    p.add_argument("--ckpt", default=None, help="DiT checkpoint; with --model embedded, a .safetensors file with "
                   "its .json config beside it (default: the official / shipped weights)")
    p.add_argument("--random-weights", action="store_true", help="random DiT weights (timing only)")
    p.add_argument("--image-size", type=int, default=256, help="DiT image size in pixels (default: %(default)s)")
    p.add_argument("--vae", choices=("ema", "mse"), default="ema", help="SD VAE variant (default: %(default)s)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default=None,
                   help="(default: the embedded model's, or ddpm for DiT)")
    p.add_argument("--steps", "--num-sampling-steps", dest="num_sampling_steps", type=positive_int, default=None,
                   help="sampling steps (default: the embedded model's, or 250 for DiT)")
    p.add_argument("--cfg-scale", type=finite_float, default=None,
                   help="guidance scale, 1 = off (default: the embedded model's, or 1.5 as DiT's FID runs)")
    p.add_argument("--guide-all-channels", action="store_true", help="guide all latent channels, not DiT's first 3")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on rank 0")
    add_device_options(p)
    add_cache_options(p)
    p.set_defaults(func=run)


def _defaults(args) -> None:
    if args.model == "embedded":
        from stepcache.models import embedded

        sampler, steps, cfg = embedded.DEFAULT_SAMPLER, embedded.DEFAULT_STEPS, embedded.DEFAULT_CFG
    else:
        sampler, steps, cfg = "ddpm", 250, 1.5
    args.sampler = args.sampler or sampler
    args.num_sampling_steps = args.num_sampling_steps or steps
    args.cfg_scale = cfg if args.cfg_scale is None else args.cfg_scale
    check_guidance_and_interval(args)


def _load(args):
    """(model, is_latent)."""
    if args.model == "embedded":
        from stepcache.models.embedded import load_embedded

        if args.ckpt and Path(args.ckpt).is_dir():
            raise CheckpointError(f"--ckpt {args.ckpt} is a folder, not a checkpoint file.")
        if args.ckpt and not Path(args.ckpt).is_file():
            raise CheckpointError(f"checkpoint {args.ckpt} does not exist.")
        return load_embedded(path=args.ckpt), False
    from stepcache.cli.common import load_model

    return load_model(argparse.Namespace(model=args.model, ckpt=args.ckpt, random_weights=args.random_weights,
                                         image_size=args.image_size, seed=args.global_seed))


def _weights_identity(args, model) -> dict:
    """What the weights are, by content: the SHA-256 of the checkpoint (and of the embedded model's JSON
    config beside it), or the seed of random weights; file names say nothing about a file's content."""
    from dataclasses import asdict

    config = asdict(model.config) if hasattr(model, "config") else {}
    if args.model == "embedded":
        from stepcache.models.embedded import WEIGHTS_FILE

        weights = Path(args.ckpt) if args.ckpt else WEIGHTS_FILE
        return {"sha256": file_sha256(weights), "config_sha256": file_sha256(weights.with_suffix(".json")),
                "config": config}
    if args.ckpt:
        return {"sha256": file_sha256(args.ckpt), "config": config}
    if args.random_weights:
        return {"random_weights_seed": args.global_seed, "config": config}
    from stepcache.models.checkpoints import resolve

    return {"sha256": file_sha256(resolve(f"DiT-XL-2-{args.image_size}x{args.image_size}.pt")), "config": config}


class LatentDecoder:
    """SD VAE (diffusers) loaded once: latents (n, 4, h, w) -> uint8 (n, 8h, 8w, 3); a clear error without it."""

    def __init__(self, vae: str, device: torch.device):
        from stepcache.cli.common import hub_reachable

        try:
            from diffusers.models import AutoencoderKL
        except Exception:
            raise CheckpointError("Cannot decode latents: diffusers is not installed.") from None
        repo = f"stabilityai/sd-vae-ft-{vae}"
        try:
            self.vae = AutoencoderKL.from_pretrained(repo, local_files_only=True)
        except Exception:
            if not hub_reachable():
                raise CheckpointError(f"Cannot decode latents: the VAE {repo} is not cached locally and the "
                                      "Hugging Face Hub cannot be reached.") from None
            try:
                self.vae = AutoencoderKL.from_pretrained(repo)
            except Exception as exc:  # network, disk or format: say which VAE and why, not a traceback
                raise CheckpointError(f"Cannot decode latents: the VAE {repo} could not be loaded "
                                      f"({type(exc).__name__}).") from None
        self.vae = self.vae.to(device).eval()

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor):
        from stepcache.io import to_uint8

        return to_uint8(self.vae.decode(latents / 0.18215).sample)


def run(args) -> int:
    import stepcache
    from stepcache.io import to_uint8
    from stepcache.sampling.ddp import DDPSampleConfig, init_distributed, run_ddp_sampling

    _defaults(args)
    if args.model != "embedded" and args.image_size % 8:
        raise ConfigError(f"--image-size must be a multiple of 8, got {args.image_size}.")
    wanted, dtype = placement(args)  # a device this machine lacks fails before anything is written or loaded
    check_output_dir(args.out_dir)
    build_policy(args)  # bad caching options fail before the model is loaded
    model, is_latent = _load(args)
    policy = build_policy(args, model=model)  # a router for another model / sampler / step count fails now
    check_fits(model, policy)
    model = model.to(dtype)
    rank, world, device = init_distributed(wanted)
    decode = LatentDecoder(args.vae, device) if is_latent else to_uint8
    cfg = DDPSampleConfig(
        num_samples=args.num_samples, batch_size=args.per_proc_batch_size, global_seed=args.global_seed,
        num_steps=args.num_sampling_steps, sampler=args.sampler, cfg_scale=float(args.cfg_scale),
        model=args.model, policy=policy.to_dict() if policy else {"method": "none"},
        guide_channels="all" if args.guide_all_channels else None,
        image_size=args.image_size if is_latent else model.input_size, vae=args.vae if is_latent else None,
        weights=_weights_identity(args, model), dtype=args.dtype)
    extra = {"environment": environment(), "checkpoint": args.ckpt}
    run_rec = run_ddp_sampling(model, cfg, args.out_dir, decode, policy=policy or stepcache.NoCache(),
                               progress=not args.no_progress, extra_record=extra, device=wanted)
    if rank == 0:
        rate = run_rec.get("samples_per_second")
        print(f"{args.num_samples} samples in {args.out_dir / 'samples.npz'} ({run_rec['samples_sampled']} sampled "
              f"now on {world} process(es)" + (f", {rate:.2f} samples/s)" if rate else ")"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0
