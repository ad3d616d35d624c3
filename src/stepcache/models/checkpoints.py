"""DiT checkpoints: local files (.pt / .safetensors) and the official DiT-XL/2 releases.

The official files (Peebles & Xie, arXiv 2212.09748; https://dl.fbaipublicfiles.com/DiT/models/) are plain
state dicts with the key names of ``stepcache.models.dit``; training checkpoints of the DiT code are dicts
with ``"model"`` and ``"ema"`` entries (the EMA weights are the ones to sample with). Meta publishes no
digests; where independent public copies agree on one (see :data:`OFFICIAL_SHA256`) it is pinned, and every
download is also verified by loading it as a state dict whose keys and shapes are exactly those of the
expected model (DiT-XL/2 at the file's resolution). Downloads go to ``stepcache.downloads.cache_home()``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch

from stepcache.errors import CheckpointError, ConfigError, ModelMismatchError
from stepcache.downloads import cache_home, fetch_file
from stepcache.io import atomic_write
from stepcache.models.dit import PRESETS, DiT, parse_preset, register_loader

BASE_URL = "https://dl.fbaipublicfiles.com/DiT/models/"
# official file name -> (preset, latent input_size = image size / 8)
OFFICIAL = {"DiT-XL-2-256x256.pt": ("DiT-XL/2", 32), "DiT-XL-2-512x512.pt": ("DiT-XL/2", 64)}
# SHA-256 of the files at BASE_URL. DiT-XL-2-256x256.pt (2,700,611,775 bytes): the Git LFS pointers of two
# independent Hub copies of the official file (huggingface.co/mytcl/DiT commit 323696d and
# huggingface.co/iasudakov/model_checkpoints commit 8b50e65, both "oid sha256:9ec1876e...", size 2700611775) and
# the digest pinned for the dl.fbaipublicfiles.com download by public DiT evaluation code on GitHub.
# DiT-XL-2-512x512.pt: no public digest was found, so it is not pinned: its download is verified by structure
# only (keys and shapes of DiT-XL/2 at 512 px), i.e. trust on first use.
OFFICIAL_SHA256 = {"DiT-XL-2-256x256.pt": "9ec1876e4c03471bca126663a30e2d1b20610b6d2f87850a39a36f25cc685521"}
REQUIRED_KEYS = ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight",
                 "final_layer.linear.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight")
CONFIG_KEY = "stepcache.dit_config"  # safetensors metadata entry written by save_dit
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


# ---------------------------------------------------------------------------------------------- files
def cache_dir(download_dir: str | os.PathLike | None = None) -> Path:
    """Where official checkpoints are kept: ``download_dir``, else ``stepcache.downloads.cache_home()``."""
    return Path(download_dir) if download_dir is not None else cache_home()


def resolve(name_or_path: str | os.PathLike, download_dir=None) -> Path:
    """A local file, or an official name found in (or downloaded to) the cache folder."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = str(name_or_path)
    if name in OFFICIAL:
        cached = cache_dir(download_dir) / name
        if cached.is_file():
            return cached
        return fetch_file(BASE_URL + name, cached, sha256=OFFICIAL_SHA256.get(name),
                          verify=lambda tmp: verify_official(tmp, name), flag="--ckpt")
    raise CheckpointError(f"No checkpoint file at {name!r}; give an existing path or one of the official names "
                          f"{', '.join(OFFICIAL)}.")


def _unwrap(obj, path: Path) -> dict:
    """Plain state dict, or the "ema" (preferred) / "model" entry of a training checkpoint."""
    if isinstance(obj, dict):
        for key in ("ema", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors.")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, stored DiT config or {}) of a .safetensors or torch .pt file (``weights_only=True``)."""
    path = Path(path)
    meta: dict = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                obj = {k: f.get_tensor(k) for k in f.keys()}
                meta = json.loads((f.metadata() or {}).get(CONFIG_KEY, "{}"))
        else:
            # DiT's train.py also stores its argparse Namespace; allow that one harmless class.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"No checkpoint file at {str(path)!r}.") from None
    except Exception as err:  # corrupt, truncated or not a checkpoint at all
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}).") from None
    return _unwrap(obj, path), _check_meta(meta, path)


def _check_meta(meta, path: Path) -> dict:
    """The stored DiT config must be an object of DiT constructor arguments (it becomes ``DiT(**meta)``)."""
    from dataclasses import fields

    from stepcache.models.dit import DiTConfig

    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has a {CONFIG_KEY} entry that is not a JSON object of DiT arguments.")
    unknown = sorted(set(meta) - {f.name for f in fields(DiTConfig)})
    if unknown:
        raise CheckpointError(f"{path} has an unknown DiT argument {unknown[0]!r} in its {CONFIG_KEY} entry.")
    return meta


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)[0]


def save_dit(model: DiT, path: str | os.PathLike) -> Path:
    """Write ``model``: .pt as a plain state dict (the official format), .safetensors with its config as metadata
    (so widths outside the preset table reload without ``num_heads=``)."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        blob = save(sd, metadata={CONFIG_KEY: json.dumps(asdict(model.config))})
        return atomic_write(path, lambda f: f.write(blob))
    return atomic_write(path, lambda f: torch.save(sd, f))


# ---------------------------------------------------------------------------------------------- architecture
def _heads_for(depth: int, hidden: int) -> int | None:
    for d, h, heads in PRESETS.values():
        if (d, h) == (depth, hidden):
            return heads
    by_hidden = {h: heads for _, h, heads in PRESETS.values()}
    return by_hidden.get(hidden)


def infer_config(sd: dict[str, torch.Tensor], **overrides) -> dict:
    """DiT constructor arguments read from a state dict; ``overrides`` win (e.g. num_heads for custom widths)."""
    missing = [k for k in REQUIRED_KEYS if k not in sd]
    if missing:
        raise CheckpointError(f"Not a DiT state dict: key {missing[0]!r} is missing.")
    tokens, hidden = sd["pos_embed"].shape[-2:]
    conv = sd["x_embedder.proj.weight"]  # (D, C, p, p)
    patch, in_channels = conv.shape[-1], conv.shape[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"pos_embed has {tokens} tokens, not a square grid.")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK.match(k)))
    out_channels = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"final layer outputs {out_channels} channels for {in_channels} input channels.")
    dropout = overrides.get("class_dropout_prob", 0.1)
    cfg = dict(input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
               depth=depth, num_heads=_heads_for(depth, hidden),
               mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden, class_dropout_prob=dropout,
               num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - int(dropout > 0),
               learn_sigma=out_channels == 2 * in_channels)
    cfg.update(overrides)
    if cfg["num_heads"] is None:
        raise ConfigError(f"Cannot infer num_heads for hidden size {hidden}; pass num_heads=... explicitly.")
    return cfg


def check_compatible(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Raise ModelMismatchError naming the first key that is missing, extra or of another shape."""
    own = model.state_dict()
    for key, value in own.items():
        if key not in sd:
            raise ModelMismatchError(f"{source} lacks {key!r}: it was made for another DiT architecture.")
        if tuple(sd[key].shape) != tuple(value.shape):
            same_width = key == "pos_embed" and sd[key].shape[-1] == value.shape[-1]
            what = "input size" if same_width else "architecture"
            raise ModelMismatchError(f"{source} has {key!r} of shape {tuple(sd[key].shape)} but the model expects "
                                     f"{tuple(value.shape)}: it was made for another {what}.")
    extra = sorted(set(sd) - set(own))
    if extra:
        raise ModelMismatchError(f"{source} has unexpected key {extra[0]!r}: it was made for another model.")


def verify_official(path: Path, name: str) -> None:
    """A downloaded official file must be a state dict with exactly DiT-XL/2's keys and shapes."""
    preset, size = OFFICIAL[name]
    with torch.device("meta"):  # shapes only, no memory
        expected = DiT.from_preset(preset, input_size=size)
    try:
        check_compatible(expected, read_state_dict(path), name)
    except (CheckpointError, ModelMismatchError) as err:
        raise CheckpointError(f"The download of {name} failed verification: {err}") from None


# ---------------------------------------------------------------------------------------------- entry point
def _config(sd, source: str, input_size, model, overrides) -> dict:
    """Constructor arguments: the state dict's shapes, then a preset name's architecture, then overrides."""
    if model is not None:  # a preset name such as "DiT-XL/2" fixes the architecture
        size, patch = parse_preset(str(model))
        depth, hidden, heads = PRESETS[size]
        overrides = dict(dict(patch_size=patch, depth=depth, hidden_size=hidden, num_heads=heads), **overrides)
    cfg = infer_config(sd, **overrides)
    if input_size is not None and input_size != cfg["input_size"]:
        raise ModelMismatchError(f"{source} is for latents of size {cfg['input_size']} "
                                 f"(images of {cfg['input_size'] * 8} px), not {input_size}.")
    return cfg


def _float32(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _into(model: DiT, sd, source: str, input_size) -> DiT:
    """Fill a given DiT in place."""
    if input_size is not None and input_size != model.input_size:
        raise ModelMismatchError(f"input_size {input_size} differs from the given model's {model.input_size}.")
    check_compatible(model, sd, source)
    model.load_state_dict(sd, strict=True)
    return model


def load_dit(name_or_path, input_size: int | None = None, model=None, device="cpu", download_dir=None,
             **overrides) -> DiT:
    """Load a DiT from a file or an official name ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt").

    ``input_size`` (latent side) and ``model`` (a preset name like "DiT-XL/2", or a DiT to fill) are
    checked against the file; without them the architecture is read from the state dict.
    ``overrides`` go to the DiT constructor (e.g. ``num_heads`` for non-preset widths).
    """
    name = str(name_or_path)
    if name in OFFICIAL and not Path(name).is_file():
        preset, size = OFFICIAL[name]
        if input_size is not None and input_size != size:
            raise ModelMismatchError(f"{name} is for latents of size {size}, not {input_size}.")
        model, input_size = model or preset, size
    path = resolve(name_or_path, download_dir)
    sd, stored = read_checkpoint(path)
    if isinstance(model, DiT):
        return _into(model, sd, path.name, input_size).to(device).eval()
    cfg = _config(sd, path.name, input_size, model, {**stored, **overrides})
    try:
        with torch.device("meta"):  # shapes are checked before any memory is spent on the model
            dit = DiT(**cfg)
    except ConfigError:
        raise
    except (TypeError, ValueError, ArithmeticError) as err:  # stored values of the wrong type
        raise CheckpointError(f"{path.name} stores a DiT config that cannot build a model "
                              f"({type(err).__name__}).") from None
    check_compatible(dit, sd, path.name)
    dit.load_state_dict(_float32(sd), strict=True, assign=True)
    return dit.to(device).eval()


register_loader("dit", load_dit)
