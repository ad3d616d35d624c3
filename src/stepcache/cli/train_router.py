"""``stepcache train-router``: learn a Learning-to-Cache router (Ma et al., arXiv 2406.01733) for a DiT.

The model stays frozen; only the router logits are trained (AdamW, clamp [-5, 5]). Checkpoints are
written every --checkpoint-every iterations; --resume continues an interrupted run exactly. Works
under ``torchrun --nproc-per-node N`` (gloo on CPU, NCCL on GPU; rank 0 writes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stepcache.cli.common import check_output_dir, finite_float, positive_int, seed_int
from stepcache.errors import ConfigError


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("train-router", help="train a Learning-to-Cache router for a DiT",
                       description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded",
                   help="'embedded', a DiT or U-ViT preset (with --ckpt or --random-weights) or a DiT checkpoint "
                        "file (default: %(default)s)")
    p.add_argument("--ckpt", default=None, help="checkpoint for a preset --model")
    p.add_argument("--random-weights", action="store_true", help="random weights for a preset (testing only)")
    p.add_argument("--image-size", type=int, choices=(256, 512), default=256,
                   help="image size of a latent model (default: %(default)s)")
    p.add_argument("--vae", choices=("ema", "mse"), default="ema", help="SD VAE for image folders "
                   "(default: %(default)s)")
    p.add_argument("--data", default="embedded",
                   help="'embedded' (digits train split), 'digits:SPLIT', a latent tensor file (.pt/.safetensors/"
                        ".npz/.npy) or an image folder root/<class>/<image> (default: %(default)s)")
    p.add_argument("--num-steps", type=positive_int, default=20,
                   help="DDIM sampling steps, even; for U-ViT: DPM-Solver++(2S) steps (default: %(default)s)")
    p.add_argument("--lambda", dest="lam", type=_nonneg_float, default=5e-6,
                   help="sparsity weight on sum(beta); U-ViT's reference uses 0.1 (default: %(default)s)")
    p.add_argument("--lr", type=_nonneg_float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--iters", type=positive_int, default=2000, help="iterations in total (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="global batch, split over processes (default: %(default)s)")
    p.add_argument("--seed", type=seed_int, default=0, help="(default: %(default)s)")
    p.add_argument("--ste-threshold", type=finite_float, default=None,
                   help="straight-through estimator threshold theta (default: off, soft blend)")
    p.add_argument("--label-dropout", type=finite_float, default=0.1, help="(default: %(default)s)")
    p.add_argument("--threshold", type=finite_float, default=0.1,
                   help="inference threshold recorded in the file and used for the skip share (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("router.safetensors"), help="(default: %(default)s)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="training checkpoint (default: OUT with suffix .train.safetensors)")
    p.add_argument("--checkpoint-every", type=positive_int, default=100, help="(default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from stepcache.cli.common import add_device_options

    add_device_options(p, dtype=False)  # the router trains in float32 against the float32 model
    p.set_defaults(func=run)


def _load(args):
    """(model, is_latent, name)."""
    from stepcache.cli.common import load_model

    if args.model != "embedded" and Path(args.model).is_file():
        from stepcache.models.dit import DiT

        return DiT.from_pretrained(args.model).eval(), True, args.model
    model, latent = load_model(args)
    return model, latent, args.model


def run(args) -> int:
    from stepcache.policies.l2c import save_router
    from stepcache.training.l2c_data import load_data
    from stepcache.training.l2c import RouterTrainConfig, init_distributed, model_identity, train_router

    from stepcache.cli import uvit

    if uvit.is_uvit(args.model):  # DPM-Solver++(2S) routers, the U-ViT objective
        return uvit.train_router(args)
    if args.ste_threshold is not None and not 0.0 < args.ste_threshold < 1.0:
        raise ConfigError(f"--ste-threshold must lie in (0, 1), got {args.ste_threshold}.")
    if not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold must lie in [0, 1], got {args.threshold}.")
    if not 0.0 <= args.label_dropout < 1.0:
        raise ConfigError(f"--label-dropout must lie in [0, 1), got {args.label_dropout}.")
    for option, path in (("--out", args.out), ("--checkpoint", args.checkpoint)):
        if path is not None and path.is_dir():
            raise ConfigError(f"{option} {path} is a folder, not a file.")
    from stepcache.cli.common import resolve_device

    wanted = resolve_device(args.device)  # before anything is written
    check_output_dir(args.out.parent if str(args.out.parent) else Path("."), "the folder of --out")
    cfg = RouterTrainConfig(num_steps=args.num_steps, lam=args.lam, lr=args.lr, iters=args.iters,
                            batch_size=args.batch_size, seed=args.seed, ste_threshold=args.ste_threshold,
                            label_dropout=args.label_dropout, threshold=args.threshold,
                            checkpoint_every=args.checkpoint_every)
    rank, _, device = init_distributed(wanted)
    model, latent, name = _load(args)
    model = model.to(device)
    data = load_data(args.data, model, latent=latent, vae=args.vae)
    checkpoint = args.checkpoint or args.out.with_suffix(".train.safetensors")
    result = train_router(model, data, cfg, checkpoint=checkpoint, resume=args.resume, model_name=name,
                          progress=not args.no_progress, device=device)
    if rank == 0:
        meta = save_router(args.out, result.logits, model=model_identity(model, name), sampler="ddim",
                           threshold=cfg.threshold, **{"lambda": cfg.lam}, lr=cfg.lr, iters=cfg.iters,
                           batch_size=cfg.batch_size, seed=cfg.seed, ste_threshold=cfg.ste_threshold,
                           data=data.source, train_seconds=round(result.seconds, 2),
                           final_loss=result.losses[-1] if result.losses else None)
        from stepcache.policies.l2c import active_units

        units = active_units(result.logits, cfg.threshold)
        print(f"wrote {args.out} ({meta['num_steps']} steps, depth {meta['depth']}): {units['active']}/"
              f"{units['total']} cache-step units recomputed at threshold {cfg.threshold} "
              f"({units['skipped_share']:.1%} skipped); trained {len(result.losses) - result.start_iteration} "
              f"iterations in {result.seconds:.1f} s")
    return 0
