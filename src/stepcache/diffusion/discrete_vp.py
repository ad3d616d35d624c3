"""A discrete-time VP noise schedule seen in continuous time, as DPM-Solver reads it (Lu et al., "DPM-Solver",
arXiv 2206.00927, Appendix: discrete-time DPMs).

The N training steps sit on the grid ``t_n = n / N``, n = 1..N, with ``log alpha_n = 0.5 * sum_{m<=n}
log(1 - beta_m)``; ``log alpha(t)`` is the piecewise-linear interpolation of that table (extended
linearly beyond its ends), ``sigma = sqrt(1 - alpha^2)`` and the half log-SNR ``lambda = log alpha -
log sigma``. Its inverse goes through ``log alpha = -0.5 * logaddexp(0, -2 lambda)`` and the same
interpolation read backwards.

Everything is float32 torch arithmetic in the order of the reference solver used by U-ViT: the
sampler amplifies a relative change of 1e-6 in a time or a coefficient to about 2e-5 in the final
latents, so a float64 or closed-form version would not reproduce it.
"""

from __future__ import annotations

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000


def scaled_linear_betas(start: float = 0.00085, end: float = 0.012,
                        num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Stable Diffusion's "scaled linear" betas (float64): a linear ramp of sqrt(beta), squared."""
    ramp = torch.linspace(start**0.5, end**0.5, num_timesteps, dtype=torch.float64)
    return (ramp**2).numpy()


def interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) through the knots (xp increasing, fp), extended linearly outside them.

    A point on a knot belongs to the segment on its left (first segment for the first knot), which is
    the segment the reference's sort-based lookup picks; the formula is the reference's, term by term.
    """
    seg = (torch.searchsorted(xp, x.contiguous()) - 1).clamp(0, xp.numel() - 2)  # (n,)
    x0, x1, y0, y1 = xp[seg], xp[seg + 1], fp[seg], fp[seg + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class DiscreteVPSchedule:
    """alpha(t), sigma(t), lambda(t) and lambda^-1 of a discrete beta table, for t in (0, 1]."""

    def __init__(self, betas: np.ndarray | torch.Tensor):
        betas = torch.as_tensor(betas).float()  # (N,) the reference casts the float64 table to float32 first
        self.num_timesteps = betas.numel()
        self.log_alpha_grid = 0.5 * torch.log(1 - betas).cumsum(dim=0)  # (N,) float32, decreasing
        self.t_grid = torch.linspace(1.0 / self.num_timesteps, 1.0, self.num_timesteps)  # (N,) float32

    @classmethod
    def scaled_linear(cls) -> "DiscreteVPSchedule":
        return cls(scaled_linear_betas())

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return interpolate(t.reshape(-1), self.t_grid.to(t.device), self.log_alpha_grid.to(t.device))

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(t)))

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        """Half log-SNR log(alpha / sigma)."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))

    def inverse_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        log_alpha = -0.5 * torch.logaddexp(torch.zeros(1, device=lam.device), -2.0 * lam)
        grid_la = torch.flip(self.log_alpha_grid, [0]).to(lam.device)  # increasing
        return interpolate(log_alpha.reshape(-1), grid_la, torch.flip(self.t_grid, [0]).to(lam.device))
