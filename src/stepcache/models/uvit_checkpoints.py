"""U-ViT checkpoints: official ``nnet_ema.pth`` state dicts (e.g. ``imagenet256_uvit_huge.pth``).

The U-ViT authors distribute bare state dicts (355 keys for ImageNet 256 U-ViT-H/2) with the key names of
:mod:`stepcache.models.uvit`; nothing is downloaded here (the files live on Google Drive). The
architecture is read from the shapes; only the number of heads is not in the file: it comes from the
official configurations (by width) or ``num_heads=``.
"""

from __future__ import annotations

import math
import os
import re

import torch

from stepcache.errors import CheckpointError, ConfigError, ModelMismatchError
from stepcache.models.checkpoints import read_checkpoint
from stepcache.models.uvit import ALIASES, PRESETS, UViT

_IN_BLOCK = re.compile(r"^in_blocks\.(\d+)\.")
REQUIRED_KEYS = ("pos_embed", "patch_embed.proj.weight", "in_blocks.0.attn.qkv.weight", "mid_block.mlp.fc1.weight",
                 "decoder_pred.weight")


def _heads_for(embed_dim: int) -> int | None:
    heads = {p["embed_dim"]: p["num_heads"] for p in PRESETS.values()}
    return heads.get(embed_dim)


def infer_config(sd: dict[str, torch.Tensor], **overrides) -> dict:
    """UViT constructor arguments read from a state dict; ``overrides`` win."""
    missing = [k for k in REQUIRED_KEYS if k not in sd]
    if missing:
        raise CheckpointError(f"Not a U-ViT state dict: key {missing[0]!r} is missing.")
    length, dim = sd["pos_embed"].shape[-2:]
    patch_w = sd["patch_embed.proj.weight"]  # (D, C, p, p)
    patch, chans = patch_w.shape[-1], patch_w.shape[1]
    extras = 2 if "label_emb.weight" in sd else 1
    grid = math.isqrt(length - extras)
    if grid * grid != length - extras:
        raise CheckpointError(f"pos_embed has {length} tokens: not {extras} extra tokens plus a square grid.")
    cfg = dict(img_size=grid * patch, patch_size=patch, in_chans=chans, embed_dim=dim,
               depth=2 * (1 + max(int(m.group(1)) for k in sd if (m := _IN_BLOCK.match(k)))),
               num_heads=_heads_for(dim), mlp_ratio=sd["mid_block.mlp.fc1.weight"].shape[0] / dim,
               qkv_bias="in_blocks.0.attn.qkv.bias" in sd, mlp_time_embed="time_embed.0.weight" in sd,
               num_classes=sd["label_emb.weight"].shape[0] if extras == 2 else -1,
               conv="final_layer.weight" in sd, skip="out_blocks.0.skip_linear.weight" in sd)
    cfg.update(overrides)
    if cfg["num_heads"] is None:
        raise ConfigError(f"Cannot infer num_heads for embed_dim {dim}; pass num_heads=... explicitly.")
    return cfg


def check_compatible(model: UViT, sd: dict[str, torch.Tensor], source: str) -> None:
    """Raise ModelMismatchError naming the first key that is missing, extra or of another shape."""
    own = model.state_dict()
    for key, value in own.items():
        if key not in sd:
            raise ModelMismatchError(f"{source} lacks {key!r}: it was made for another U-ViT architecture.")
        if tuple(sd[key].shape) != tuple(value.shape):
            raise ModelMismatchError(f"{source} has {key!r} of shape {tuple(sd[key].shape)} but the model expects "
                                     f"{tuple(value.shape)}: it was made for another architecture.")
    extra = sorted(set(sd) - set(own))
    if extra:
        raise ModelMismatchError(f"{source} has unexpected key {extra[0]!r}: it was made for another model.")


def load_uvit(path: str | os.PathLike, model: str | UViT | None = None, device="cpu", **overrides) -> UViT:
    """Load a U-ViT from a ``.pth`` / ``.pt`` / ``.safetensors`` state dict (``weights_only`` loading).

    ``model``: a preset name (``"U-ViT-H/2"``) the file must match, or a UViT to fill in place.
    """
    sd, _ = read_checkpoint(path)
    source = os.path.basename(str(path))
    if isinstance(model, UViT):
        check_compatible(model, sd, source)
        model.load_state_dict(sd, strict=True)
        return model.to(device).eval()
    cfg = infer_config(sd, **overrides)
    if model is not None:
        key = ALIASES.get(str(model), str(model))
        if key not in PRESETS:
            raise ConfigError(f"Unknown U-ViT {model!r}; choose one of {', '.join([*ALIASES, *PRESETS])}.")
        cfg = {**cfg, **PRESETS[key], **overrides}
    with torch.device("meta"):  # shapes are checked before any memory is spent on the model
        net = UViT(**cfg)
    check_compatible(net, sd, source)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    net.load_state_dict(sd, strict=True, assign=True)
    return net.to(device).eval()
