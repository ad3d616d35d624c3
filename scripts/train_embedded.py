"""Train the embedded digits DiT (stepcache's own DiT class, pixel space, 1 channel) on CPU.

Recipe (DiT, Peebles & Xie, arXiv 2212.09748, shrunk): linear betas over T=1000, uniform t,
epsilon-prediction MSE (Ho et al., arXiv 2006.11239, "L_simple"), fixed variance (learn_sigma=False),
label dropout 0.1 for classifier-free guidance, AdamW with linear warm-up, a constant rate and an
optional linear cool-down at the end, EMA weights (shipped). Light augmentation: random shifts of up to
``--shift`` pixels (no flips: digits).

Seeded and reproducible: every random draw comes from one generator (and the global RNG, used by
DiT's label dropout); both states are saved in the periodic checkpoints, so ``--resume`` continues the
same run. Usage::

    nohup .venv/bin/python scripts/train_embedded.py --work-dir runs/embedded --steps 8500 --cooldown 2500 \
        > /dev/null 2>&1 &                                            # the shipped weights' run
    .venv/bin/python scripts/train_embedded.py --work-dir runs/embedded --steps 8500 --cooldown 2500 --export

then ``scripts/eval_embedded.py`` judges the result and ``scripts/refresh_embedded.sh`` remakes everything
that depends on the weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

# Passive OpenMP threads: on a shared, oversubscribed CPU spinning threads waste half the cycles.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from stepcache.diffusion.schedule import Diffusion  # noqa: E402
from stepcache.models.dit import DiT, config_dict  # noqa: E402
from stepcache.models.embedded import CONFIG_FILE, RESOLUTION, WEIGHTS_FILE, digits_data  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, default=Path("runs/embedded"),
                   help="checkpoints + log (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps (default: %(default)s)")
    p.add_argument("--cooldown", type=int, default=0,
                   help="decay the rate linearly to 0 over the last N of --steps (default: %(default)s, constant)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay cap (default: %(default)s)")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--resolution", type=int, default=RESOLUTION)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--shift", type=int, default=1, help="max random shift in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from work-dir/last.pt")
    p.add_argument("--keep-every", type=int, default=0,
                   help="also keep work-dir/step_N.pt every N steps, to compare milestones (default: off)")
    p.add_argument("--export", action="store_true", help="only export work-dir/last.pt's EMA to the assets")
    p.add_argument("--export-dir", type=Path, default=None,
                   help="write the exported weights + config here instead of stepcache/assets")
    p.add_argument("--from", dest="from_ckpt", type=Path, default=None,
                   help="with --export: export this checkpoint instead of work-dir/last.pt")
    return p.parse_args(argv)


def build_model(args) -> DiT:
    return DiT(input_size=args.resolution, patch_size=args.patch, in_channels=1, hidden_size=args.width,
               depth=args.depth, num_heads=args.heads, class_dropout_prob=0.1, num_classes=10, learn_sigma=False)


def lr_at(step: int, args) -> float:
    """Linear warm-up, then constant, then (``--cooldown``) a linear decay to 0 over the last steps.

    Before the cool-down a run of N steps is the exact prefix of any longer run, so a run can be
    resumed with a larger ``--steps`` and a cool-down added only at its end.
    """
    rate = args.lr * min(1.0, (step + 1) / args.warmup)
    if args.cooldown > 0:
        rate *= min(1.0, (args.steps - step) / args.cooldown)
    return rate


def random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Shift each image (B, 1, R, R) by up to ``max_shift`` pixels, padding with background (-1)."""
    if max_shift <= 0:
        return x
    B, _, R, _ = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # (B, 1, R+2s, R+2s)
    offs = torch.randint(0, 2 * max_shift + 1, (B, 2), generator=g)
    return torch.stack([padded[b, :, oy:oy + R, ox:ox + R] for b, (oy, ox) in enumerate(offs.tolist())])


def train_step(model, opt, diffusion, images, labels, g, args) -> float:
    B = args.batch
    idx = torch.randint(0, images.shape[0], (B,), generator=g)
    x0 = random_shift(images[idx], args.shift, g)  # (B, 1, R, R)
    t = torch.randint(0, 1000, (B,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    xt = diffusion.q_sample(x0, t, noise)
    loss = F.mse_loss(model(xt, t, labels[idx]), noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


@torch.no_grad()
def ema_update(ema, model, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def save_checkpoint(path: Path, step, model, ema, opt, g, loss_avg, elapsed) -> None:
    state = {"step": step, "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
             "gen": g.get_state(), "global_rng": torch.get_rng_state(), "loss_avg": loss_avg, "elapsed": elapsed}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def export(args, log) -> None:
    """Write the EMA weights (safetensors) and the JSON config into stepcache/assets."""
    from safetensors.torch import save_file

    state = torch.load(args.from_ckpt or args.work_dir / "last.pt", weights_only=False)
    model = build_model(args)
    model.load_state_dict(state["ema"])
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    weights_file, config_file = WEIGHTS_FILE, CONFIG_FILE
    if args.export_dir is not None:
        weights_file, config_file = args.export_dir / WEIGHTS_FILE.name, args.export_dir / CONFIG_FILE.name
    weights_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(weights_file))
    meta = {"model": config_dict(model),
            "training": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                         if k not in ("resume", "export", "work_dir", "export_dir", "from_ckpt", "keep_every")}
            | {"steps_done": state["step"], "loss_ema": state["loss_avg"], "wall_seconds": round(state["elapsed"])}}
    config_file.write_text(json.dumps(meta, indent=2) + "\n")
    log(f"exported step {state['step']} EMA weights to {weights_file} ({weights_file.stat().st_size / 1e6:.1f} MB)")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(args.work_dir / "train.log", "a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    if args.export:
        return export(args, log)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = build_model(args).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    images, labels = digits_data("train", args.resolution)
    diffusion = Diffusion(1000)
    step, loss_avg, elapsed = 0, None, 0.0
    last = args.work_dir / "last.pt"
    if args.resume and last.is_file():
        state = torch.load(last, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["gen"])
        torch.set_rng_state(state["global_rng"])
        step, loss_avg, elapsed = state["step"], state["loss_avg"], state["elapsed"]
        log(f"resumed at step {step}")
    else:
        log(f"start: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {vars(args)}")
    t0 = time.time() - elapsed
    while step < args.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss = train_step(model, opt, diffusion, images, labels, g, args)
        step += 1
        ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
        loss_avg = loss if loss_avg is None else 0.98 * loss_avg + 0.02 * loss
        if step % 20 == 0 or step == args.steps:
            log(f"step {step}/{args.steps} loss {loss:.4f} smooth {loss_avg:.4f} lr {lr_at(step - 1, args):.2e} "
                f"{(time.time() - t0) / step:.2f}s/step")
        if step % args.ckpt_every == 0 or step == args.steps:
            save_checkpoint(last, step, model, ema, opt, g, loss_avg, time.time() - t0)
        if args.keep_every and step % args.keep_every == 0:
            save_checkpoint(args.work_dir / f"step_{step}.pt", step, model, ema, opt, g, loss_avg, time.time() - t0)
    log(f"done in {(time.time() - t0) / 60:.1f} min")
    export(args, log)


if __name__ == "__main__":
    main()
