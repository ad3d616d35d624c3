"""U-ViT in the CLI: ``--model U-ViT-H/2`` (or an official config name, or ``U-ViT`` for any U-ViT whose
architecture is read from ``--ckpt``) for ``sample`` and ``train-router``.

A U-ViT needs ``--ckpt`` (an official ``nnet_ema.pth``-style state dict; the U-ViT authors distribute them,
nothing is downloaded) or ``--random-weights``. Its routers are trained for DPM-Solver++(2S):
``--num-steps`` counts solver steps (NFE = 2 x steps) and the file holds one row per model evaluation,
the layout of the reference's dpm20/dpm50 routers.
"""

from __future__ import annotations

from stepcache.errors import ConfigError
from stepcache.models.uvit import ALIASES, PRESETS


GENERIC = "U-ViT"  # any U-ViT: the architecture is read from --ckpt


def is_uvit(name: str) -> bool:
    return name == GENERIC or name in ALIASES or name in PRESETS


def load(args):
    """(model, is_latent) for a U-ViT --model."""
    from stepcache.models.uvit import UViT
    from stepcache.models.uvit_checkpoints import load_uvit

    if args.ckpt:
        model = load_uvit(args.ckpt, model=None if args.model == GENERIC else args.model)
    elif args.random_weights and args.model != GENERIC:
        model = UViT.from_preset(args.model)
    else:
        raise ConfigError(f"{args.model} needs --ckpt FILE (an official nnet_ema.pth state dict) or --random-weights.")
    return model.eval(), model.in_chans == 4


def train_router(args) -> int:
    """``stepcache train-router --model U-ViT-...``: the U-ViT objective (training/l2c_dpm.py)."""
    from stepcache.policies.l2c import save_router
    from stepcache.training.l2c_data import load_data
    from stepcache.policies.l2c_dpm import staged_active_units
    from stepcache.training.l2c_dpm import StagedRouterTrainConfig, train_staged_router
    from stepcache.training.l2c import model_identity
    from stepcache.sampling.ddp import init_distributed

    if args.resume or args.ste_threshold is not None:
        raise ConfigError("--resume and --ste-threshold are not available for U-ViT routers yet.")
    cfg = StagedRouterTrainConfig(num_steps=args.num_steps, l1_weight=args.lam, lr=args.lr, iters=args.iters,
                                  batch_size=args.batch_size, seed=args.seed, label_dropout=args.label_dropout,
                                  threshold=args.threshold)
    from stepcache.cli.common import resolve_device

    rank, _, device = init_distributed(resolve_device(getattr(args, "device", None)))
    model, latent = load(args)
    model = model.to(device)
    data = load_data(args.data, model, latent=latent, vae=args.vae)
    result = train_staged_router(model, data, cfg, progress=not args.no_progress, device=device)
    if rank == 0:
        identity = {**model_identity(model, args.model), "family": "uvit"}
        save_router(args.out, result.logits, model=identity, sampler="dpm-solver++2s", threshold=cfg.threshold,
                    l1_weight=cfg.l1_weight, lr=cfg.lr, iters=cfg.iters, batch_size=cfg.batch_size, seed=cfg.seed,
                    data=data.source, train_seconds=round(result.seconds, 2), final_loss=result.losses[-1])
        units = staged_active_units(result.logits, cfg.threshold)
        print(f"wrote {args.out} ({2 * cfg.num_steps} rows for {cfg.num_steps} DPM-Solver++(2S) steps): "
              f"{units['active']}/{units['total']} cache-step units recomputed at threshold {cfg.threshold} "
              f"({units['skipped_share']:.1%} skipped); {cfg.iters} iterations in {result.seconds:.1f} s")
    return 0
