"""Judge the embedded digits DiT: class accuracy, Fréchet distance and IS analogue of its samples.

Samples ``--num`` digits (labels 0..9 in turn, fixed seeds) at DDIM-50 for each CFG scale and scores
them with the digit judge (``stepcache.eval.digits``) against the 360 held-out digits. The floor is
the same score for real training digits: ``--floor-draws`` random subsets of ``--num`` digits (their
mean and spread; FD depends strongly on the sample count, so only rows of equal count compare), and
all 1,437. Usage::

    .venv/bin/python scripts/eval_embedded.py --out benchmarks/results/embedded_quality.json
    .venv/bin/python scripts/eval_embedded.py --weights /tmp/emb/embedded_dit.safetensors --num 100
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from stepcache.eval.digits import score_digits
from stepcache.models.embedded import DEFAULT_STEPS, digits_data, load_embedded
from stepcache.sampling.sample import sample


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=None, help="embedded_dit.safetensors (default: the shipped one)")
    p.add_argument("--num", type=int, default=200, help="samples per CFG scale (default: %(default)s)")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.5, 4.0], help="CFG scales (default: %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--floor-draws", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    return p.parse_args(argv)


@torch.no_grad()
def samples(model, num: int, cfg: float, steps: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` images (num, 1, R, R) in [-1, 1] and their requested labels, batch by batch (fixed seeds)."""
    R = model.input_size if hasattr(model, "input_size") else model.grid * model.patch_size
    images, labels = [], []
    for start in range(0, num, batch):
        n = min(batch, num - start)
        g = torch.Generator().manual_seed(seed + start)
        y = torch.arange(start, start + n) % 10
        noise = torch.randn(n, model.in_channels, R, R, generator=g)
        images.append(sample(model, noise, y, num_steps=steps, sampler="ddim", cfg_scale=cfg, generator=g))
        labels.append(y)
    return torch.cat(images).clamp(-1, 1), torch.cat(labels)


def floor(num: int, draws: int) -> dict:
    """Scores of real training digits: ``draws`` random subsets of ``num``, and all of them."""
    images, labels = digits_data("train")
    g = torch.Generator().manual_seed(0)
    subsets = [score_digits(images[idx], labels[idx]) for idx in
               (torch.randperm(images.shape[0], generator=g)[:num] for _ in range(draws))]
    fds = [s.frechet_distance for s in subsets]
    return {f"real_train_{num}_vs_heldout": {"frechet_distance_mean": statistics.mean(fds),
                                             "frechet_distance_min": min(fds), "frechet_distance_max": max(fds),
                                             "class_accuracy": statistics.mean(s.class_accuracy for s in subsets),
                                             "draws": draws, "num_images": num},
            "real_train_all_vs_heldout": score_digits(images, labels).to_dict()}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_embedded(path=args.weights)
    runs = []
    for cfg in args.cfg:
        t0 = time.perf_counter()
        images, labels = samples(model, args.num, cfg, args.steps, args.batch, args.seed)
        scores = score_digits(images, labels).to_dict() | {"cfg_scale": cfg, "seconds": time.perf_counter() - t0}
        runs.append(scores)
        print(f"CFG {cfg}: accuracy {scores['class_accuracy']:.3f}  FD {scores['frechet_distance']:.2f}  "
              f"IS {scores['inception_score']:.2f}  ({scores['seconds']:.0f} s)", flush=True)
    floors = floor(args.num, args.floor_draws)
    sub = floors[f"real_train_{args.num}_vs_heldout"]
    print(f"floor, {args.num} real digits: FD {sub['frechet_distance_mean']:.2f} "
          f"({sub['frechet_distance_min']:.2f}-{sub['frechet_distance_max']:.2f} over {args.floor_draws} draws)")
    if args.out is not None:
        record = {"weights": str(args.weights or "shipped"), "num_samples": args.num, "sampler": "ddim",
                  "num_steps": args.steps, "seed": args.seed, "runs": runs, "floor": floors,
                  "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                  "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
