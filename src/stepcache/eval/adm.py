"""The ADM evaluator's pipeline in-process: npz batches in, FID / sFID / IS / precision / recall out.

Follows guided-diffusion ``evaluations/evaluator.py`` (Dhariwal & Nichol, 2021):

- A sample or reference batch is an ``.npz`` whose ``arr_0`` holds uint8 images (N, H, W, 3).
- A reference batch may also carry precomputed statistics ``mu``/``sigma`` (pool features) and
  ``mu_s``/``sigma_s`` (spatial features), like ``VIRTUAL_imagenet256_labeled.npz``; when present they are
  used for FID / sFID (as ADM's ``read_statistics`` does) and ``arr_0`` is used only for precision/recall.
- Inception Score is computed on the samples only; precision/recall on pool features of both sets.

Grey images (N, H, W) or (N, H, W, 1) are repeated to 3 channels.
"""

from __future__ import annotations

import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from stepcache.errors import CheckpointError, ConfigError, ModelMismatchError
from stepcache.eval.features import ImageFeatures, extract_features
from stepcache.eval.metrics import FeatureStats, inception_score, precision_recall

__all__ = ["ReferenceBatch", "EvalResult", "load_images", "load_reference", "reference_from_images",
           "digits_reference", "evaluate", "evaluate_features"]


@dataclass
class ReferenceBatch:
    """What a reference npz gives: statistics (precomputed or computed) and, if it has images, features."""

    stats: FeatureStats | None
    spatial_stats: FeatureStats | None
    features: ImageFeatures | None
    num_images: int


@dataclass
class EvalResult:
    """ADM's five numbers (None where the inputs cannot give one) and how they were obtained."""

    fid: float
    sfid: float | None
    inception_score: float | None
    precision: float | None
    recall: float | None
    num_samples: int
    num_reference: int
    features: str

    def as_dict(self) -> dict:
        return asdict(self)


def _open(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"The npz file {path} does not exist.")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} is not a readable .npz file ({type(exc).__name__}).") from None


def _array(npz, key: str, path) -> np.ndarray:
    """``npz[key]``, read now: numpy reads lazily, so an object (pickled) array fails only on access."""
    try:
        value = npz[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        why = "an object array, which is never unpickled" if "allow_pickle" in str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}:{key} cannot be read ({why}).") from None
    if not isinstance(value, np.ndarray):  # numpy hands back the raw bytes of a member that is not an .npy
        raise CheckpointError(f"{path}:{key} cannot be read (not an .npy array).")
    return value


def as_rgb_uint8(images: np.ndarray, where: str = "arr_0") -> np.ndarray:
    """uint8 (N, H, W), (N, H, W, 1) or (N, H, W, 3) -> (N, H, W, 3)."""
    if images.dtype != np.uint8:
        raise ConfigError(f"{where} must hold uint8 images, got {images.dtype}.")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ConfigError(f"{where} must have shape (N, H, W, 3), got {tuple(images.shape)}.")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def load_images(path: str | Path) -> np.ndarray:
    """The ``arr_0`` images of an npz, as uint8 (N, H, W, 3)."""
    with _open(path) as npz:
        if "arr_0" not in npz.files:
            raise ConfigError(f"{path} has no 'arr_0' array of images (keys: {', '.join(npz.files) or 'none'}).")
        return as_rgb_uint8(_array(npz, "arr_0", path), f"{Path(path).name}:arr_0")


def _stats(npz, mu: str, sigma: str, path) -> FeatureStats | None:
    """Precomputed statistics, refused unless they are finite numbers of matching shapes (F,), (F, F):
    NaN statistics would otherwise give ``fid: nan`` and an exit code of 0."""
    if mu not in npz.files or sigma not in npz.files:
        return None
    try:
        m, s = np.asarray(_array(npz, mu, path), np.float64), np.asarray(_array(npz, sigma, path), np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}:{mu}/{sigma} are not numeric arrays.") from None
    if m.ndim != 1 or s.shape != (m.shape[0], m.shape[0]):
        raise ConfigError(f"{path}:{mu}/{sigma} have shapes {m.shape} and {s.shape}; expected (F,) and (F, F).")
    if not (np.isfinite(m).all() and np.isfinite(s).all()):
        raise ConfigError(f"{path}:{mu}/{sigma} hold NaN or infinite values.")
    return FeatureStats(m, s)


def load_reference(path: str | Path, extractor, batch_size: int = 64) -> ReferenceBatch:
    """Read a reference npz: precomputed ``mu``/``sigma`` (+ ``mu_s``/``sigma_s``) and/or ``arr_0`` images."""
    with _open(path) as npz:
        stats, spatial = _stats(npz, "mu", "sigma", path), _stats(npz, "mu_s", "sigma_s", path)
        images = as_rgb_uint8(_array(npz, "arr_0", path), f"{Path(path).name}:arr_0") if "arr_0" in npz.files \
            else None
    if stats is None and images is None:
        raise ConfigError(f"{path} holds neither images ('arr_0') nor statistics ('mu' and 'sigma').")
    feats = extract_features(images, extractor, batch_size) if images is not None else None
    if stats is None:
        stats = FeatureStats.from_features(feats.pool)
        spatial = FeatureStats.from_features(feats.spatial) if feats.spatial is not None else None
    return ReferenceBatch(stats, spatial, feats, 0 if images is None else len(images))


def reference_from_images(images: np.ndarray, extractor, batch_size: int = 64) -> ReferenceBatch:
    """A reference batch computed from uint8 images (N, H, W, 3) held in memory."""
    feats = extract_features(as_rgb_uint8(images, "reference images"), extractor, batch_size)
    spatial = FeatureStats.from_features(feats.spatial) if feats.spatial is not None else None
    return ReferenceBatch(FeatureStats.from_features(feats.pool), spatial, feats, len(images))


def digits_reference(split: str, extractor, batch_size: int = 64) -> ReferenceBatch:
    """The embedded model's real digits (``split``: "test" = held out, "train", "all") as a reference batch,
    quantised to uint8 like samples, so that ``--features digits`` runs fully offline."""
    from stepcache.io import to_uint8
    from stepcache.models.embedded import digits_data

    images, _ = digits_data(split)                                             # (N, 1, 16, 16) in [-1, 1]
    return reference_from_images(to_uint8(images), extractor, batch_size)


def _check_dims(name: str, ref: FeatureStats | None, feats: np.ndarray | None, network: str) -> None:
    if ref is not None and feats is not None and ref.mu.shape[0] != feats.shape[1]:
        raise ModelMismatchError(f"The reference {name} statistics have {ref.mu.shape[0]} dimensions but the "
                                 f"{network} features have {feats.shape[1]}; they come from another network.")


def evaluate_features(samples: ImageFeatures, ref: ReferenceBatch, network: str = "features",
                      pr_batch_size: int = 1024, device: str = "cpu") -> EvalResult:
    """The five metrics from sample features and a reference batch (pure math, no network)."""
    _check_dims("pool", ref.stats, samples.pool, network)
    _check_dims("spatial", ref.spatial_stats, samples.spatial, network)
    fid = FeatureStats.from_features(samples.pool).frechet_distance(ref.stats)
    sfid = None
    if samples.spatial is not None and ref.spatial_stats is not None:
        sfid = FeatureStats.from_features(samples.spatial).frechet_distance(ref.spatial_stats)
    score = inception_score(samples.probs) if samples.probs is not None else None
    prec = rec = None
    if ref.features is not None:
        prec, rec = precision_recall(ref.features.pool, samples.pool, batch_size=pr_batch_size, device=device)
    return EvalResult(fid=fid, sfid=sfid, inception_score=score, precision=prec, recall=rec,
                      num_samples=len(samples.pool), num_reference=ref.num_images, features=network)


def evaluate(samples_path: str | Path, ref_path: "str | Path | ReferenceBatch", extractor, batch_size: int = 64,
             device: str = "cpu") -> EvalResult:
    """ADM's evaluation of ``samples_path`` against ``ref_path`` (an npz, ``"digits:SPLIT"`` for the embedded
    model's real digits, or a :class:`ReferenceBatch`) with a feature ``extractor``."""
    images = load_images(samples_path)
    if len(images) < 2:
        raise ConfigError(f"{samples_path} holds {len(images)} image(s); the metrics need at least 2.")
    if isinstance(ref_path, ReferenceBatch):
        ref = ref_path
    elif str(ref_path).startswith("digits:"):
        ref = digits_reference(str(ref_path).split(":", 1)[1], extractor, batch_size)
    else:
        ref = load_reference(ref_path, extractor, batch_size)
    samples = extract_features(images, extractor, batch_size)
    return evaluate_features(samples, ref, getattr(extractor, "name", "features"), device=device)
