"""Sample-quality metrics with the ADM evaluator's definitions, on precomputed features.

The formulas follow guided-diffusion's ``evaluations/evaluator.py`` (Dhariwal & Nichol, "Diffusion Models Beat
GANs on Image Synthesis", 2021), which itself follows pytorch-fid / TTUR (Heusel et al., "GANs Trained by a Two
Time-Scale Update Rule Converge to a Local Nash Equilibrium", 2017):

- FID / sFID: Frechet distance between Gaussians fitted to pool3 (FID) or spatial mixed_6/conv (sFID) features.
- Inception Score (Salimans et al., 2016): exp(E_x KL(p(y|x) || p(y))), averaged over splits of 5,000 samples
  (10 splits for the usual 50,000 samples), as ADM does.
- Precision / recall (Kynkaanniemi et al., "Improved Precision and Recall Metric for Assessing Generative
  Models", 2019): k=3 nearest-neighbour manifolds, see :mod:`stepcache.eval.adm`.

Everything here works on numpy arrays in float64 (design principle 8); the features themselves come from
:mod:`stepcache.eval.features`.

Agreement with ADM's own code (its numpy parts transcribed outside the repo, its TF distance block replaced by
numpy; 3,000 + 3,000 synthetic 2048-d ReLU features, 12,000 x 1008 logits): FID identical on the same float64
statistics (ADM computing them from float32 activations: relative difference 1.4e-8); Inception Score
identical; precision/recall identical with float32 distances (0.0860 / 0.9707). ADM computes distances in
float16 when they are finite; emulating that moved precision by 1 sample in 3,000 (0.0863), so precision and
recall may differ from ADM's in the last digits. Tests also check the formulas against independent ones
(eigendecomposition Frechet distance, scipy entropy IS, brute-force cdist precision/recall).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from stepcache.errors import ConfigError, require

__all__ = ["FeatureStats", "frechet_distance", "inception_score", "softmax", "manifold_radii", "precision_recall"]

# ADM adds this to both covariances' diagonals when sqrtm of the product is not finite (pytorch-fid does too).
SQRTM_EPS = 1e-6
# ADM refuses a matrix square root whose diagonal has an imaginary part above this tolerance.
IMAG_ATOL = 1e-3
# ADM's Inception Score splits the predictions in chunks of this many samples.
IS_SPLIT_SIZE = 5000


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a feature set, in float64 (what ADM stores as ``mu``/``sigma`` in its npz)."""

    mu: np.ndarray      # (F,)
    sigma: np.ndarray   # (F, F)

    @classmethod
    def from_features(cls, features: np.ndarray) -> "FeatureStats":
        """Fit a Gaussian to ``features`` (N, F): sample mean and unbiased covariance (np.cov, ddof=1)."""
        feats = _as_2d_float64(features, "features")
        if feats.shape[0] < 2:
            raise ConfigError(f"Feature statistics need at least 2 samples, got {feats.shape[0]}.")
        mu = feats.mean(axis=0)                         # (F,)
        sigma = np.cov(feats, rowvar=False)             # (F, F)
        return cls(mu=mu, sigma=np.atleast_2d(sigma))

    def frechet_distance(self, other: "FeatureStats") -> float:
        """Frechet distance between this Gaussian and ``other``'s."""
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def to_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Arrays under ADM's key names: ``mu``/``sigma`` (prefix "") or ``mu_s``/``sigma_s`` (prefix "_s")."""
        return {f"mu{prefix}": self.mu, f"sigma{prefix}": self.sigma}


def _as_2d_float64(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ConfigError(f"{name} must be a 2-D array (N, F), got shape {tuple(arr.shape)}.")
    return arr


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = SQRTM_EPS) -> float:
    """Frechet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    As in ADM / pytorch-fid: scipy.linalg.sqrtm of S1 @ S2; if that is not finite (near-singular
    covariances, e.g. fewer samples than feature dimensions), ``eps`` is added to both diagonals and the
    root recomputed; a complex result is accepted only when its diagonal's imaginary part is below 1e-3,
    and then its real part is used.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ConfigError(f"Feature statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, "
                          f"sigma {sigma1.shape} vs {sigma2.shape}.")
    diff = mu1 - mu2                                                    # (F,)
    covmean = _sqrtm(sigma1 @ sigma2)                                   # (F, F)
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
                      RuntimeWarning, stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_ATOL):
            worst = float(np.max(np.abs(covmean.imag)))
            raise ConfigError(f"The covariance square root has an imaginary component of {worst:.3g}; "
                              "the feature statistics are degenerate (too few samples?).")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """Principal matrix square root (scipy), tolerating scipy's warnings on singular input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = require("scipy.linalg", "The Frechet distance").sqrtm(a)
    return root[0] if isinstance(root, tuple) else root


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64: (N, C) logits -> (N, C) probabilities."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def inception_score(probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Inception Score of class probabilities ``probs`` (N, C), ADM's way.

    The predictions are cut in consecutive chunks of ``split_size`` (ADM: 5,000, so 10 splits for 50,000
    samples); each chunk scores exp(mean_x sum_y p(y|x) (log p(y|x) - log p(y))) with p(y) the chunk's
    mean prediction; the result is the mean over chunks. Zero probabilities contribute 0 (0 log 0 = 0).
    """
    preds = _as_2d_float64(probs, "probs")
    if preds.shape[0] == 0 or split_size < 1:
        raise ConfigError("The Inception Score needs at least one sample and a positive split size.")
    scores = []
    for start in range(0, preds.shape[0], split_size):
        part = preds[start:start + split_size]                          # (n, C)
        marginal = part.mean(axis=0, keepdims=True)                     # (1, C)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


# ---------------------------------------------------------------- improved precision and recall
# Kynkaanniemi et al. 2019, as ADM's ManifoldEstimator runs it: squared Euclidean distances, the radius of a
# point is its distance to its k-th nearest neighbour within its own set (k=3, the point itself excluded),
# a point is "in" the other set's manifold when it lies within some ball of that set (distance <= radius).
NHOOD_SIZE = 3


def _pairwise_sq_dists(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(n, F), (m, F) -> (n, m) squared Euclidean distances, ||u||^2 - 2 u.v + ||v||^2 clamped at 0 (as ADM)."""
    d = (u * u).sum(1, keepdim=True) - 2.0 * (u @ v.T) + (v * v).sum(1)[None, :]
    return d.clamp_min_(0.0)


def manifold_radii(features: np.ndarray, k: int = NHOOD_SIZE, batch_size: int = 1024,
                   dtype: torch.dtype = torch.float32, device: str = "cpu") -> np.ndarray:
    """(N,) squared distance of each point to its k-th nearest neighbour in ``features`` (N, F)."""
    feats = torch.as_tensor(np.asarray(features), dtype=dtype, device=device)
    n = feats.shape[0]
    if not 1 <= k < n:
        raise ConfigError(f"Precision/recall with k={k} neighbours needs more than {k} samples per set, got {n}.")
    radii = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, batch_size):
        d = _pairwise_sq_dists(feats[start:start + batch_size], feats)      # (b, N), includes self (0)
        radii[start:start + batch_size] = d.kthvalue(k + 1, dim=1).values.to("cpu", torch.float64)
    return radii.numpy()


def _within(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> np.ndarray:
    """(n,) bool: is each point inside at least one ball (centre, radius)? Batched over both sets."""
    inside = torch.zeros(points.shape[0], dtype=torch.bool)
    for i in range(0, points.shape[0], batch_size):
        p = points[i:i + batch_size]
        hit = torch.zeros(p.shape[0], dtype=torch.bool, device=points.device)
        for j in range(0, centres.shape[0], batch_size):
            d = _pairwise_sq_dists(p, centres[j:j + batch_size])            # (b, c)
            hit |= (d <= radii[None, j:j + batch_size]).any(dim=1)
        inside[i:i + batch_size] = hit.cpu()
    return inside.numpy()


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, k: int = NHOOD_SIZE,
                     batch_size: int = 1024, dtype: torch.dtype = torch.float32, device: str = "cpu"
                     ) -> tuple[float, float]:
    """Improved precision (share of samples inside the reference manifold) and recall (share of references
    inside the sample manifold), with k-NN balls; ADM's ``compute_prec_recall`` on pool features."""
    ref = torch.as_tensor(np.asarray(ref_features), dtype=dtype, device=device)            # (N1, F)
    gen = torch.as_tensor(np.asarray(sample_features), dtype=dtype, device=device)         # (N2, F)
    if ref.dim() != 2 or gen.dim() != 2 or ref.shape[1] != gen.shape[1]:
        raise ConfigError(f"Feature sets disagree in shape: {tuple(ref.shape)} vs {tuple(gen.shape)}.")
    r_ref = torch.as_tensor(manifold_radii(ref_features, k, batch_size, dtype, device), dtype=dtype, device=device)
    r_gen = torch.as_tensor(manifold_radii(sample_features, k, batch_size, dtype, device), dtype=dtype,
                            device=device)
    precision = float(_within(gen, ref, r_ref, batch_size).mean())
    recall = float(_within(ref, gen, r_gen, batch_size).mean())
    return precision, recall
