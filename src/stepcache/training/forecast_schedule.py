"""Learn a Forecast schedule for one model: which steps to compute so that forecasting the rest stays
closest to the uncached run, for a given number of full steps.

The objective is end-to-end: the PSNR of the final samples against the uncached samples of the same
calibration seeds (computed once). The search starts from the best spaced schedule
(:func:`stepcache.policies.forecast.spaced_schedule` over a few powers) and moves one full step at a
time by +-1 or +-2 steps while that improves the calibration PSNR (coordinate descent). Check the
result on held-out seeds: the calibration seeds are what it was fitted to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stepcache.eval.fidelity import psnr
from stepcache.policies.forecast import Forecast, spaced_schedule
from stepcache.sampling.sample import sample

POWERS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)


@dataclass
class ScheduleSearch:
    """The learned policy, its calibration PSNR, and every schedule tried with its PSNR."""

    policy: Forecast
    psnr: float
    tried: list = field(default_factory=list)


def _score(model, noise, labels, reference, policy, **run) -> float:
    out = sample(model, noise, labels, policy=policy, **run)
    return float(psnr(out, reference).mean())


@torch.no_grad()
def learn_schedule(model, noise: torch.Tensor, labels: torch.Tensor, *, num_steps: int, num_full: int,
                   order: int = 2, sampler: str = "ddim", cfg_scale: float = 4.0, sweeps: int = 2,
                   moves: tuple[int, ...] = (-2, -1, 1, 2), progress=None) -> ScheduleSearch:
    """The schedule of ``num_full`` full steps with the best calibration PSNR found (see the module doc)."""
    run = dict(num_steps=num_steps, sampler=sampler, cfg_scale=cfg_scale)
    reference = sample(model, noise, labels, **run)
    tried: dict[tuple, float] = {}

    def score(steps: tuple) -> float:
        if steps not in tried:
            tried[steps] = _score(model, noise, labels, reference,
                                  Forecast(full_steps=steps, num_steps=num_steps, order=order), **run)
            if progress:
                progress(steps, tried[steps])
        return tried[steps]

    best = max((spaced_schedule(num_steps, num_full, p) for p in POWERS), key=score)
    for _ in range(sweeps):
        improved = False
        for k in range(2, len(best)):  # 0 and 1 stay: the first values to extrapolate from
            for move in moves:
                s = best[k] + move
                if s in best or not best[k - 1] < s < (best[k + 1] if k + 1 < len(best) else num_steps):
                    continue
                cand = tuple(sorted(best[:k] + (s,) + best[k + 1:]))
                if score(cand) > score(best):
                    best, improved = cand, True
        if not improved:
            break
    policy = Forecast(full_steps=best, num_steps=num_steps, order=order)
    return ScheduleSearch(policy, tried[best], sorted(tried.items(), key=lambda kv: -kv[1]))
