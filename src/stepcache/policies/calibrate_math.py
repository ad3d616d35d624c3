"""Calibration arithmetic for the dynamic policies: MagCache magnitude ratios and TeaCache's polynomial.

Recording happens during uncached runs (:mod:`stepcache.training.calibrate`); this module only
turns the recorded tensors into the numbers the configs load, and writes the calibration file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from stepcache.errors import ConfigError
from stepcache.policies.calibration_data import FORMAT


def magnitude_ratio(prev: torch.Tensor, cur: torch.Tensor) -> float:
    """mean over batch and tokens of ||R_s|| / (||R_{s-1}|| + 1e-8), L2 over channels, in float32
    (MagCache's definition, as diffusers' calibrate mode computes it)."""
    cur_norm = torch.linalg.norm(cur.float(), dim=-1)  # (B, T)
    prev_norm = torch.linalg.norm(prev.float(), dim=-1)  # (B, T)
    return (cur_norm / (prev_norm + 1e-8)).mean().item()


def mag_ratios(residuals: Sequence[torch.Tensor]) -> list[float]:
    """Ratios of one run's per-step stack residuals (entry 0 = 1.0)."""
    return [1.0] + [magnitude_ratio(a, b) for a, b in zip(residuals[:-1], residuals[1:])]


def mean_ratios(runs: Sequence[Sequence[float]]) -> list[float]:
    """Elementwise mean over runs of equal length."""
    if not runs or len({len(r) for r in runs}) != 1:
        raise ConfigError("Calibration runs must all have the same number of steps.")
    return np.mean(np.asarray(runs, dtype=np.float64), axis=0).tolist()


def fit_teacache(x: Sequence[float], y: Sequence[float], degree: int = 4) -> tuple[list[float], float]:
    """TeaCache's rescaling polynomial: ``np.polyfit(x, y, 4)`` of the output change ``y`` against
    the modulated-input change ``x`` (rel-L1 between consecutive steps), highest power first; with R²."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y) or len(x) <= degree:
        raise ConfigError(f"TeaCache calibration needs more than {degree} step pairs, got {len(x)}; "
                          f"run more steps or samples.")
    coefficients = np.polyfit(x, y, degree)
    residual = y - np.polyval(coefficients, x)
    total = ((y - y.mean()) ** 2).sum()
    r2 = float(1 - (residual ** 2).sum() / total) if total > 0 else 1.0
    return coefficients.tolist(), r2


def write_calibration(path: Path, *, model: str, family: str, num_steps: int, mag_ratios: list[float] | None,
                      teacache_coefficients: list[float] | None, extra: dict | None = None) -> dict:
    """Write the JSON that ``MagCache(mag_ratios=path)`` and ``TeaCache(coefficients=path)`` load (atomically)."""
    record = {"format": FORMAT, "model": model, "family": family, "num_steps": num_steps}
    if mag_ratios is not None:
        record["mag_ratios"] = mag_ratios
    if teacache_coefficients is not None:
        record["teacache_coefficients"] = teacache_coefficients
    record.update(extra or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
    return record
