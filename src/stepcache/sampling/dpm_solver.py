"""DPM-Solver++(2S): second-order singlestep solver in data prediction (Lu et al., "DPM-Solver++",
arXiv 2211.01095, Algorithm 1 with r = 1/2; the reference singlestep form of DPM-Solver, arXiv 2206.00927).

N steps on the uniform time grid ``t = linspace(1, eps, N + 1)``; each step s -> t evaluates the
denoiser twice, at s (stage 0) and at the midpoint s1 in half log-SNR (stage 1), so N steps are 2N
model evaluations. With ``h = lambda_t - lambda_s``::

    x0_s  = D(x, s)
    s1    = lambda^-1(lambda_s + h / 2)
    x_s1  = (sigma_s1 / sigma_s) x - alpha_s1 expm1(-h / 2) x0_s
    x0_s1 = D(x_s1, s1)
    x_t   = (sigma_t / sigma_s) x - alpha_t expm1(-h) x0_s - (1 / (2 r)) alpha_t expm1(-h) (x0_s1 - x0_s)

(the last line equals ``... - alpha_t expm1(-h) x0_s1``; the three-term form is kept because it is what
the reference runs, in float32, and the final latents are sensitive to the order of operations). The
x at ``t = eps`` is returned as is (no final denoising step).
"""

from __future__ import annotations

from typing import Callable

import torch

from stepcache.diffusion.discrete_vp import DiscreteVPSchedule

R1 = 0.5  # midpoint ratio in lambda


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against x."""
    return v[(...,) + (None,) * (x.dim() - 1)]


def time_grid(num_steps: int, t_end: float = 1e-3, t_start: float = 1.0) -> torch.Tensor:
    """(N + 1,) float32 times from t_start down to t_end."""
    return torch.linspace(t_start, t_end, num_steps + 1)


def dpm_solver_2s_step(denoise: Callable, schedule: DiscreteVPSchedule, x: torch.Tensor, s: torch.Tensor,
                       t: torch.Tensor, j: int) -> torch.Tensor:
    """One step from times s to t (B,) (step j of the clock): two denoiser calls, stage 0 then 1."""
    ns = schedule
    lambda_s, lambda_t = ns.lambda_(s), ns.lambda_(t)
    h = lambda_t - lambda_s
    s1 = ns.inverse_lambda(lambda_s + R1 * h)
    sigma_s, sigma_s1, sigma_t = ns.sigma(s), ns.sigma(s1), ns.sigma(t)
    alpha_s1, alpha_t = torch.exp(ns.log_alpha(s1)), torch.exp(ns.log_alpha(t))
    phi_11, phi_1 = torch.expm1(-R1 * h), torch.expm1(-h)

    x0_s = denoise(x, s, j, 0)
    x_s1 = _col(sigma_s1 / sigma_s, x) * x - _col(alpha_s1 * phi_11, x) * x0_s
    x0_s1 = denoise(x_s1, s1, j, 1)
    return (_col(sigma_t / sigma_s, x) * x - _col(alpha_t * phi_1, x) * x0_s
            - (0.5 / R1) * _col(alpha_t * phi_1, x) * (x0_s1 - x0_s))


def dpm_solver_2s(denoise: Callable, schedule: DiscreteVPSchedule, x: torch.Tensor, num_steps: int,
                  t_end: float = 1e-3, t_start: float = 1.0) -> torch.Tensor:
    """Integrate from t_start to t_end in ``num_steps`` steps.

    ``denoise(x, t, j, stage)`` returns the data prediction x0 (shaped like x) at continuous times t (B,);
    j is the step (0 .. N-1) and ``stage`` 0 at the start of the step, 1 at its midpoint: the clock the
    caching runtime is told.
    """
    grid = time_grid(num_steps, t_end, t_start).to(x.device)
    ones = torch.ones((x.shape[0],), device=x.device)
    for j in range(num_steps):
        x = dpm_solver_2s_step(denoise, schedule, x, ones * grid[j], ones * grid[j + 1], j)  # (B,) times
    return x


def data_prediction(eps_fn: Callable, schedule: DiscreteVPSchedule) -> Callable:
    """Turn ``eps_fn(x, t, j, stage)`` (noise prediction) into the denoiser D = (x - sigma eps) / alpha."""

    def denoise(x, t, j, stage):
        eps = eps_fn(x, t, j, stage)
        return (x - _col(schedule.sigma(t), x) * eps) / _col(schedule.alpha(t), x)

    return denoise
