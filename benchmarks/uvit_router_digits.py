"""Does a trained L2C router beat random placement on a U-ViT? A small U-ViT trained on the digits, CPU.

1. Trains a small class-conditional U-ViT (pixel space, 1 x 16 x 16, 64 patches + label and time tokens) on
   the embedded digits' training split with U-ViT's discrete recipe: Stable Diffusion's betas, n uniform
   in 1..1000, epsilon-prediction MSE, label dropout 0.1 (null label 10), AdamW, EMA weights
   (or loads them with --weights).
2. Trains a DPM-Solver++(2S) router (training/l2c_dpm.py, the reference's objective).
3. Compares, at the same number of recomputed cache-step units: the trained router, random placements
   (3 seeds), and skipping every unit of every cache step — by the objective's error of the hard
   decisions and by the fidelity of the final samples to the uncached ones (same seeds), plus the
   digit judge's class accuracy.

The README's records (1 torch thread each):

    python benchmarks/uvit_router_digits.py --train-iters 1000 --save-weights w1k.pth \\
        --out benchmarks/results/uvit_router_digits.json
    python benchmarks/uvit_router_digits.py --init-weights w1k.pth --train-iters 2000 --save-weights w3k.pth \\
        --out benchmarks/results/uvit_router_digits_3k.json
    python benchmarks/uvit_router_digits.py --weights w3k.pth --l1-weight 0.1 \\
        --out benchmarks/results/uvit_router_digits_3k_l1_0.1.json
    python benchmarks/uvit_router_digits.py --weights w1k.pth --l1-weight 0.1 \\
        --out benchmarks/results/uvit_router_digits_l1_0.1.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import stepcache
from stepcache.cli.common import environment
from stepcache.diffusion.discrete_vp import scaled_linear_betas
from stepcache.eval.fidelity import fidelity
from stepcache.models.embedded import digits_data
from stepcache.training.l2c_data import RouterData
from stepcache.policies.l2c_dpm import staged_active_units
from stepcache.training.l2c_dpm import (StagedRouterTrainConfig, random_placement, staged_router_error,
                                              train_staged_router)


def train_uvit(args, data: RouterData) -> tuple[stepcache.UViT, dict]:
    """U-ViT's discrete training: x_n = sqrt(abar_n) x0 + sqrt(1 - abar_n) eps, n ~ U{1..1000}, predict eps."""
    torch.manual_seed(args.seed)
    model = stepcache.UViT(img_size=16, patch_size=2, in_chans=1, embed_dim=args.width, depth=args.depth,
                           num_heads=args.heads, num_classes=11, conv=False)
    if args.init_weights is not None:  # continue an earlier run (its EMA weights; the optimizer starts afresh)
        model.load_state_dict(torch.load(args.init_weights, weights_only=True))
    ema = copy.deepcopy(model).requires_grad_(False)
    abar = torch.from_numpy(scaled_linear_betas()).float()
    abar = torch.cumprod(1 - abar, dim=0)  # abar[n - 1] for n = 1..1000
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    losses, start = [], time.perf_counter()
    for it in range(args.train_iters):
        x0, y = data.batch(args.batch_size, g)
        n = torch.randint(1, 1001, (x0.shape[0],), generator=g)
        y = torch.where(torch.rand(y.shape[0], generator=g) < 0.1, torch.full_like(y, 10), y)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[n - 1].view(-1, 1, 1, 1)
        loss = ((model(a.sqrt() * x0 + (1 - a).sqrt() * eps, n.float(), y) - eps) ** 2).mean()
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (it + 1) / 100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + it) / (10 + it))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(decay).add_(pm, alpha=1 - decay)
        losses.append(float(loss.detach()))
        if (it + 1) % 100 == 0:
            print(f"uvit iter {it + 1}: loss {statistics.mean(losses[-100:]):.4f}", flush=True)
    info = {"iters": args.train_iters, "batch_size": args.batch_size, "lr": args.lr,
            "init_weights": str(args.init_weights) if args.init_weights else None,
            "seconds": time.perf_counter() - start, "final_loss_mean100": statistics.mean(losses[-100:])}
    return ema.eval(), info


def samples(model, policy, n: int, steps: int, cfg: float):
    g = torch.Generator().manual_seed(1234)
    z = torch.randn(n, 1, 16, 16, generator=g)
    y = torch.arange(n) % 10
    out = stepcache.sample(model, z, y, num_steps=steps, sampler="dpm-solver++2s", cfg_scale=cfg, policy=policy)
    return out.clamp(-1, 1), y


def accuracy(images, labels) -> float:
    from stepcache.eval.digits import classify

    _, logits = classify(images)  # numpy (N, 10)
    return float((torch.from_numpy(logits.argmax(axis=1)) == labels).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=None, help="load the U-ViT state dict instead of training")
    ap.add_argument("--init-weights", type=Path, default=None, help="start the U-ViT training from these weights")
    ap.add_argument("--save-weights", type=Path, default=None, help="write the trained U-ViT state dict here")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4, help="in + out blocks (5 blocks with the mid block)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--train-iters", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=10, help="DPM-Solver++(2S) steps (NFE = 2 x steps)")
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--router-iters", type=int, default=300)
    ap.add_argument("--l1-weight", type=float, default=0.5)
    ap.add_argument("--router-lr", type=float, default=0.1)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--n", type=int, default=100, help="samples for fidelity and accuracy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/uvit_router_digits.json"))
    args = ap.parse_args()

    images, labels = digits_data("train", resolution=16)
    data = RouterData(images, labels, flip=False, source="digits:train")
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "env": environment(),
              "args": {k: str(v) for k, v in vars(args).items()}}
    if args.weights is not None:
        model = stepcache.UViT(img_size=16, patch_size=2, in_chans=1, embed_dim=args.width, depth=args.depth,
                               num_heads=args.heads, num_classes=11, conv=False)
        model.load_state_dict(torch.load(args.weights, weights_only=True))
        model.eval()
    else:
        model, record["uvit_training"] = train_uvit(args, data)
        if args.save_weights is not None:
            torch.save(model.state_dict(), args.save_weights)
    base, y = samples(model, None, args.n, args.steps, args.cfg_scale)
    record["uncached_class_accuracy"] = accuracy(base, y)
    print(f"uncached accuracy {record['uncached_class_accuracy']:.3f}", flush=True)

    cfg = StagedRouterTrainConfig(num_steps=args.steps, l1_weight=args.l1_weight, lr=args.router_lr,
                                  iters=args.router_iters, batch_size=8, seed=args.seed, threshold=args.threshold)
    result = train_staged_router(model, data, cfg, progress=True)
    logits = result.logits
    units = staged_active_units(logits, args.threshold)
    record["router"] = {"seconds": result.seconds, "iters": cfg.iters, "l1_weight": cfg.l1_weight, "lr": cfg.lr,
                        "active": units["active"], "total": units["total"], "per_step": units["per_step"]}

    def evaluate(name, table):
        out, _ = samples(model, stepcache.L2C(table, threshold=args.threshold), args.n, args.steps, args.cfg_scale)
        row = {"policy": name, "objective_error": staged_router_error(model, data, table, cfg, args.threshold),
               "class_accuracy": accuracy(out, y), **fidelity(out, base)}
        print(json.dumps(row), flush=True)
        return row

    rows = [evaluate("trained", logits)]
    rows += [evaluate(f"random-{s}", random_placement(logits, units["active"], s)) for s in range(3)]
    rows.append(evaluate("skip-all", random_placement(logits, 0, 0)))
    record["results"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
