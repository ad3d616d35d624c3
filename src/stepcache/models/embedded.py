"""The embedded model: a small class-conditional DiT trained on scikit-learn's handwritten digits.

The data are the UCI ML hand-written digits (Alpaydin & Kaynak, 1998; CC BY 4.0) bundled with
scikit-learn as ``load_digits``: 1,797 grey images of 8x8 pixels, values 0..16, 10 classes. They are
split once (stratified, 20% held out, seed 0), scaled to [-1, 1] and upsampled bilinearly to
``RESOLUTION`` pixels, so that a patch-2 DiT sees a token grid like DiT's. ``scripts/train_embedded.py``
trains the model; its EMA weights ship as ``stepcache/assets/embedded_dit.safetensors`` with a JSON
config beside them (see ``assets/MODEL_CARD.md``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stepcache.errors import CheckpointError, ConfigError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS_FILE = ASSETS / "embedded_dit.safetensors"
CONFIG_FILE = ASSETS / "embedded_dit.json"

RESOLUTION = 16          # pixels per side after upsampling (8x8 -> 16x16, patch 2 -> 64 tokens)
SPLIT_SEED = 0           # fixed held-out split
TEST_FRACTION = 0.2
NUM_CLASSES = 10

# Default sampling settings of the embedded model (chosen by measuring quality; see MODEL_CARD.md).
DEFAULT_SAMPLER = "ddim"
DEFAULT_STEPS = 50
DEFAULT_CFG = 4.0


def _split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train / held-out indices, fixed by ``SPLIT_SEED``."""
    from stepcache.errors import require

    train_test_split = require("sklearn.model_selection", "The digits data set").train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED)
    return np.sort(train), np.sort(test)


def upsample(images: torch.Tensor, resolution: int = RESOLUTION) -> torch.Tensor:
    """(N, 1, 8, 8) in [-1, 1] -> (N, 1, R, R) by bilinear interpolation (no corner alignment)."""
    if images.shape[-1] == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)


@lru_cache(maxsize=4)
def _digits(split: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    from stepcache.errors import require

    load_digits = require("sklearn.datasets", "The digits data set").load_digits

    data = load_digits()
    train, test = _split_indices(data.target)
    rows = {"train": train, "test": test, "all": np.arange(len(data.target))}[split]
    pixels = torch.from_numpy(data.images[rows].astype(np.float32))  # (N, 8, 8) in 0..16
    images = upsample((pixels / 16.0 * 2.0 - 1.0).unsqueeze(1), resolution)  # (N, 1, R, R)
    labels = torch.from_numpy(data.target[rows].astype(np.int64))
    return images.contiguous(), labels


def digits_data(split: str = "train", resolution: int = RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, R, R) float32 in [-1, 1] and labels (N,) int64 of ``split`` ("train", "test", "all")."""
    if split not in ("train", "test", "all"):
        raise ConfigError(f"Unknown digits split {split!r}; choose 'train', 'test' or 'all'.")
    if int(resolution) < 8:
        raise ConfigError(f"resolution must be >= 8 pixels, got {resolution}.")
    images, labels = _digits(split, int(resolution))
    return images.clone(), labels.clone()


def embedded_config(path: Path = CONFIG_FILE) -> dict:
    """The shipped JSON config: ``{"model": DiT kwargs, "training": {...}, "sampling": {...}}``.

    A config beside a user's weights can be anything: malformed JSON, a list, unknown or missing DiT
    arguments are refused here in one sentence, before a model is built from them."""
    from dataclasses import fields

    from stepcache.models.dit import DiTConfig

    if not path.is_file():
        raise CheckpointError(f"The embedded model config {path} is missing; run scripts/train_embedded.py.")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable JSON model config ({type(exc).__name__}).") from None
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"{path} has no \"model\" object of DiT arguments.")
    known = {f.name for f in fields(DiTConfig)}
    unknown = sorted(set(model) - known)
    if unknown:
        raise CheckpointError(f"{path} has an unknown DiT argument {unknown[0]!r}.")
    return config


def load_embedded(device: str | torch.device = "cpu", path: Path | None = None) -> "torch.nn.Module":
    """The embedded digits DiT (EMA weights) in eval mode on ``device``."""
    from safetensors.torch import load_file

    from stepcache.models.dit import DiT

    weights = Path(path) if path is not None else WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"The embedded model weights {weights} are missing; run scripts/train_embedded.py.")
    config = embedded_config(weights.with_suffix(".json"))
    try:
        model = DiT(**config["model"])
    except (TypeError, ValueError, ArithmeticError) as exc:  # e.g. a width the head count does not divide
        raise CheckpointError(f"{weights.with_suffix('.json')} does not describe a buildable DiT "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}).") from None
    try:
        state = load_file(str(weights))
    except Exception as exc:  # truncated or not a safetensors file at all (safetensors' errors are untyped)
        raise CheckpointError(f"{weights} is not a readable .safetensors checkpoint ({type(exc).__name__}).") \
            from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not match its config: {str(exc).splitlines()[0]}") from None
    if path is None:  # the shipped weights: their published MagCache / TeaCache tables apply
        model.stepcache_names = ("embedded",)
    return model.to(device).eval()
