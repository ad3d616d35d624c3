"""One reverse step of each sampler, on DiT's respaced schedule.

Both draw standard-normal noise of the full batch shape at every step (DDIM multiplies it by
sigma = 0), exactly as DiT's loops consume the global RNG, so seeded runs reproduce them.
"""

from __future__ import annotations

import torch

from stepcache.diffusion.schedule import Diffusion


def _noise(x: torch.Tensor, generator) -> torch.Tensor:
    """Noise shaped like x from the global RNG, one generator, or a list of per-sample generators (row r uses
    ``generator[r % len(generator)]``, so with CFG the cond and uncond rows of image k share image k's)."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(x.shape[1:], generator=generator[r % len(generator)], device=x.device,
                                        dtype=x.dtype) for r in range(x.shape[0])])
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _nonzero(i: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (i != 0).float().view(-1, *([1] * (x.dim() - 1)))


def ddpm_step(diffusion: Diffusion, out: torch.Tensor, x: torch.Tensor, i: torch.Tensor,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestral step x_t -> x_{t-1} with learned-range variance (Ho et al. 2020, Alg. 2)."""
    pmv = diffusion.p_mean_variance(out, x, i)
    noise = _noise(x, generator)
    return pmv["mean"] + _nonzero(i, x) * torch.exp(0.5 * pmv["log_variance"]) * noise


def ddim_step(diffusion: Diffusion, out: torch.Tensor, x: torch.Tensor, i: torch.Tensor,
              generator: torch.Generator | None = None, eta: float = 0.0) -> torch.Tensor:
    """DDIM step (Song et al., arXiv 2010.02502, eq. 12); deterministic for eta = 0."""
    pmv = diffusion.p_mean_variance(out, x, i)
    eps = diffusion.predict_eps(x, i, pmv["pred_xstart"])
    alpha_bar = diffusion.extract(diffusion.alphas_cumprod, i, x.shape)
    alpha_bar_prev = diffusion.extract(diffusion.alphas_cumprod_prev, i, x.shape)
    sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
    noise = _noise(x, generator)
    mean = pmv["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
    return mean + _nonzero(i, x) * sigma * noise


SAMPLERS = {"ddpm": ddpm_step, "ddim": ddim_step}
