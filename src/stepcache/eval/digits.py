"""The digit judge: a small CNN trained on the embedded model's training split only.

It scores samples of the embedded model the way Inception scores ImageNet samples: class accuracy of
conditional samples (does the digit match the requested label), the Fréchet distance of its
penultimate features against the held-out real digits (Heusel et al., arXiv 1706.08500) and an
Inception-Score analogue (Salimans et al., arXiv 1606.03498) on its class probabilities. Numbers are
only comparable with each other, never with Inception-based ones. Trained by
``scripts/train_digit_classifier.py``; weights ship as ``stepcache/assets/digit_classifier.safetensors``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stepcache.errors import CheckpointError, ConfigError
from stepcache.eval.metrics import FeatureStats, inception_score, softmax

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CLASSIFIER_FILE = ASSETS / "digit_classifier.safetensors"
INPUT_SIZE = 16          # the classifier sees 16x16 images in [-1, 1]
FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """conv(32)x2 -> pool -> conv(64)x2 -> pool -> linear(128) [features] -> linear(10) [logits]."""

    def __init__(self, num_classes: int = 10, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 32, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),                                                    # (N, 32, 8, 8)
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, 64, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),                                                    # (N, 64, 4, 4)
        )
        self.fc = nn.Linear(64 * (INPUT_SIZE // 4) ** 2, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) in [-1, 1] -> (N, 1, 16, 16) float32, resized (antialiased bilinear) if needed."""
        if images.dim() != 4 or images.shape[1] != 1:
            raise ConfigError(f"digit images must have shape (N, 1, H, W), got {tuple(images.shape)}.")
        x = images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, 128)."""
        h = self.conv(self.prepare(images)).flatten(1)                          # (N, 1024)
        return F.gelu(self.fc(h))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10)."""
        return self.head(self.dropout(self.features(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images)


@lru_cache(maxsize=1)
def _load(path: str) -> DigitClassifier:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise CheckpointError(f"The digit classifier {path} is missing; run scripts/train_digit_classifier.py.")
    net = DigitClassifier()
    try:
        net.load_state_dict(load_file(path))
    except RuntimeError as exc:
        raise CheckpointError(f"{path} is not a digit classifier: {str(exc).splitlines()[0]}") from None
    return net.eval().requires_grad_(False)


def load_digit_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The shipped classifier (eval mode, CPU, no grad); cached after the first load."""
    return _load(str(path if path is not None else CLASSIFIER_FILE))


@torch.no_grad()
def classify(images: torch.Tensor, net: DigitClassifier | None = None, batch_size: int = 256):
    """(features (N, 128), logits (N, 10)) as float64 numpy arrays."""
    net = net or load_digit_classifier()
    feats, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        f = net.features(images[start:start + batch_size].cpu())
        feats.append(f.double().numpy())
        logits.append(net.head(f).double().numpy())
    if not feats:
        raise ConfigError("There are no images to classify.")
    return np.concatenate(feats), np.concatenate(logits)


@lru_cache(maxsize=2)
def reference_stats(split: str = "test") -> FeatureStats:
    """Feature statistics of the real digits of ``split`` (default: the held-out ones)."""
    from stepcache.models.embedded import digits_data

    images, _ = digits_data(split)
    return FeatureStats.from_features(classify(images)[0])


@dataclass(frozen=True)
class DigitScores:
    """Quality of a set of digit images: accuracy vs requested labels, Fréchet distance, IS analogue."""

    class_accuracy: float | None
    frechet_distance: float
    inception_score: float
    num_images: int

    def to_dict(self) -> dict:
        return asdict(self)


def score_digits(images: torch.Tensor, labels: torch.Tensor | None = None,
                 reference: FeatureStats | None = None) -> DigitScores:
    """Score images (N, 1, H, W) in [-1, 1]; ``labels`` (N,) are the requested classes (or None)."""
    if images.shape[0] < 2:
        raise ConfigError(f"Scoring digits needs at least 2 images, got {images.shape[0]}.")
    feats, logits = classify(images.clamp(-1, 1))
    acc = None
    if labels is not None:
        if labels.shape != (images.shape[0],):
            raise ConfigError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}.")
        acc = float((logits.argmax(1) == labels.cpu().numpy()).mean())
    ref = reference if reference is not None else reference_stats("test")
    fd = FeatureStats.from_features(feats).frechet_distance(ref)
    return DigitScores(acc, fd, inception_score(softmax(logits), split_size=len(logits)), int(images.shape[0]))
