"""Train the digit judge (stepcache.eval.digits.DigitClassifier) on the embedded model's TRAINING split.

The held-out split is never seen during training; its accuracy is printed at the end and must be
>= 97%. Seeded (one generator for batches and augmentation). Augmentation: random shifts of up to one
pixel and light Gaussian noise, so that the judge tolerates the small defects of generated digits.

    .venv/bin/python scripts/train_digit_classifier.py          # writes stepcache/assets/digit_classifier.safetensors
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from stepcache.eval.digits import CLASSIFIER_FILE, DigitClassifier
from stepcache.models.embedded import digits_data


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30, help="passes over the training split (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts in {-1, 0, 1} pixels (background padding) plus N(0, 0.05^2) noise; x (B, 1, R, R)."""
    B, _, R, _ = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)                        # (B, 1, R+2, R+2)
    offs = torch.randint(0, 3, (B, 2), generator=g).tolist()
    out = torch.stack([padded[b, :, oy:oy + R, ox:ox + R] for b, (oy, ox) in enumerate(offs)])
    return out + 0.05 * torch.randn(out.shape, generator=g)


@torch.no_grad()
def accuracy(net: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    return float((net.logits(images).argmax(1) == labels).float().mean())


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x_train, y_train = digits_data("train")
    x_test, y_test = digits_data("test")
    net = DigitClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = (len(y_train) + args.batch - 1) // args.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    t0 = time.time()
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(y_train), generator=g)
        for start in range(0, len(order), args.batch):
            idx = order[start:start + args.batch]
            loss = F.cross_entropy(net.logits(augment(x_train[idx], g)), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 5 == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f} train acc {accuracy(net, x_train, y_train):.4f}",
                  flush=True)
    acc = accuracy(net, x_test, y_test)
    print(f"held-out accuracy {acc:.4f} ({len(y_test)} digits), {time.time() - t0:.0f} s", flush=True)
    if acc < 0.97:
        raise SystemExit(f"held-out accuracy {acc:.4f} is below the 0.97 floor; not saving.")
    from safetensors.torch import save_file

    CLASSIFIER_FILE.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(CLASSIFIER_FILE))
    print(f"saved {CLASSIFIER_FILE}")


if __name__ == "__main__":
    main()
