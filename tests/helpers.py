"""Tiny random-weight models for tests, with DiT's zero-initialised layers re-randomised."""

from __future__ import annotations

import torch

from stepcache import DiT
from stepcache.cli.common import randomize_


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-randomise every parameter except pos_embed (the paper zeroes adaLN and the final layer)."""
    randomize_(model, seed)
    return model


def tiny_dit(depth: int = 4, hidden: int = 64, heads: int = 4, input_size: int = 8, patch: int = 2,
             num_classes: int = 10, seed: int = 0, **kw) -> DiT:
    torch.manual_seed(seed)
    model = DiT(input_size=input_size, patch_size=patch, in_channels=4, hidden_size=hidden, depth=depth,
                num_heads=heads, num_classes=num_classes, **kw)
    return randomize(model, seed).eval()
