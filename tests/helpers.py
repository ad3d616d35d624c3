"""Tiny random-weight models for tests, with DiT's zero-initialised layers re-randomised."""

from __future__ import annotations

import torch

from stepcache import DiT
from stepcache.cli.common import randomize_


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-randomise every parameter except pos_embed (the paper zeroes adaLN and the final layer)."""
    randomize_(model, seed)
    return model


def randomize_fan_in(model: torch.nn.Module, seed: int = 0, bias_std: float = 0.1) -> torch.nn.Module:
    """diffusers transformers: fan-in scaled matrices, biases of std ``bias_std``, norm gains 1 +- 0.1, adaLN
    tables (``scale_shift_table``) of std D^-1/2; in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.rsplit(".", 1)[0].rsplit(".", 1)[-1] and name.endswith("weight") and p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("scale_shift_table"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_(bias_std * torch.randn(p.shape, generator=g))
    return model.eval()


def pipeline_family(families: dict, name: str) -> tuple:
    """(name, pipe, run, run(pipe)) for ``families[name] = (build, run)``: the tiny pipeline built, its progress
    bar off, and its uncached output (the baseline every invariant compares with)."""
    build, run = families[name]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    return name, pipe, run, run(pipe)


def tiny_dit(depth: int = 4, hidden: int = 64, heads: int = 4, input_size: int = 8, patch: int = 2,
             num_classes: int = 10, seed: int = 0, **kw) -> DiT:
    torch.manual_seed(seed)
    model = DiT(input_size=input_size, patch_size=patch, in_channels=4, hidden_size=hidden, depth=depth,
                num_heads=heads, num_classes=num_classes, **kw)
    return randomize(model, seed).eval()


def tiny_uvit(depth: int = 4, embed_dim: int = 32, heads: int = 2, img_size: int = 8, patch: int = 2,
              num_classes: int = 11, seed: int = 0, **kw):
    """A random U-ViT whose branches matter: fan-in-scaled weights, LayerNorm gains 1 +- 0.1, position and
    label tables of std 0.5 (the paper's init leaves the branches tiny next to the residual stream)."""
    from stepcache import UViT

    torch.manual_seed(seed)
    model = UViT(img_size=img_size, patch_size=patch, in_chans=4, embed_dim=embed_dim, depth=depth, num_heads=heads,
                 num_classes=num_classes, conv=kw.pop("conv", False), **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name in ("pos_embed", "label_emb.weight"):
                p.copy_(0.5 * noise)
            elif p.dim() >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model.eval()


def hand_fora_pass(model, x, t, y, cache: dict, refresh: bool):
    """One forward of a native DiT with FORA written out by hand from the spec (DiT's block arithmetic,
    ``x + gate * a`` with the full adaLN): on ``refresh`` every block's attention and MLP outputs are
    recomputed into ``cache`` ((layer, "a" | "m") -> tensor), otherwise the cached ones are reused."""
    from stepcache.models.dit import modulate

    h, c = model.embed(x, t, y)
    for l, blk in enumerate(model.blocks):
        s1, sc1, g1, s2, sc2, g2 = blk.modulation(c)
        if refresh:
            cache[l, "a"] = blk.attn(modulate(blk.norm1(h), s1, sc1))
        h = h + g1.unsqueeze(1) * cache[l, "a"]
        if refresh:
            cache[l, "m"] = blk.mlp(modulate(blk.norm2(h), s2, sc2))
        h = h + g2.unsqueeze(1) * cache[l, "m"]
    return model.unpatchify(model.final_layer(h, c))
