"""The DDPM noise schedule of DiT, respaced to S sampling steps.

Linear betas 1e-4..0.02 over T=1000 (Ho et al., arXiv 2006.11239), learned-range variance
(Nichol & Dhariwal, arXiv 2102.09672, eq. 15). All tables are float64 numpy arrays; a value is
looked up per batch row and cast to float32, as the reference diffusion code does, so that
seeded runs reproduce the reference to float precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from stepcache.errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def respaced_timesteps(num_steps: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """Kept original timesteps, ascending: round(k * (T-1)/(S-1)) by a running float sum."""
    if not 1 <= num_steps <= num_timesteps:
        raise ConfigError(f"num_steps must be between 1 and {num_timesteps}, got {num_steps}.")
    stride = (num_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 1
    taken, cur = [], 0.0
    for _ in range(num_steps):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


@dataclass
class Diffusion:
    """Respaced Gaussian diffusion tables, indexed by the respaced step index i in 0..S-1."""

    num_steps: int
    timestep_map: np.ndarray = field(init=False)  # (S,) original timestep of each respaced index
    betas: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        kept = set(respaced_timesteps(self.num_steps))
        base_cumprod = np.cumprod(1.0 - self.base_betas(), axis=0)
        betas, mapping, last = [], [], 1.0
        for t, a in enumerate(base_cumprod):
            if t in kept:
                betas.append(1 - a / last)
                last = a
                mapping.append(t)
        self.timestep_map = np.array(mapping, dtype=np.int64)
        self.betas = np.array(betas, dtype=np.float64)
        b = self.betas
        alphas = 1.0 - b
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        post_var = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = (
            np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.log(np.maximum(post_var, 1e-20))
        )
        self.posterior_mean_coef1 = b * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(b)

    def base_betas(self) -> np.ndarray:
        """The T training betas before respacing (a subclass may train on another table)."""
        return linear_betas()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def extract(table: np.ndarray, i: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """table[i] per row as float32, broadcast to ``shape``."""
        out = torch.from_numpy(table).to(device=i.device)[i].float()
        while out.dim() < len(shape):
            out = out[..., None]
        return out + torch.zeros(shape, device=i.device)

    def model_timesteps(self, i: torch.Tensor) -> torch.Tensor:
        """Respaced indices -> original timesteps fed to the model."""
        return torch.tensor(self.timestep_map, device=i.device, dtype=i.dtype)[i]

    def predict_xstart(self, x: torch.Tensor, i: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.extract(self.sqrt_recip_alphas_cumprod, i, x.shape) * x - self.extract(
            self.sqrt_recipm1_alphas_cumprod, i, x.shape) * eps

    def predict_eps(self, x: torch.Tensor, i: torch.Tensor, xstart: torch.Tensor) -> torch.Tensor:
        return (self.extract(self.sqrt_recip_alphas_cumprod, i, x.shape) * x - xstart) / self.extract(
            self.sqrt_recipm1_alphas_cumprod, i, x.shape)

    def q_sample(self, x0: torch.Tensor, i: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.extract(self.sqrt_alphas_cumprod, i, x0.shape) * x0 + self.extract(
            self.sqrt_one_minus_alphas_cumprod, i, x0.shape) * noise

    def p_mean_variance(self, model_output: torch.Tensor, x: torch.Tensor, i: torch.Tensor) -> dict:
        """Posterior mean and log-variance from an (eps, v) output with learned-range variance."""
        C = x.shape[1]
        if model_output.shape[1] == 2 * C:
            eps, var_values = torch.split(model_output, C, dim=1)
            min_log = self.extract(self.posterior_log_variance_clipped, i, x.shape)
            max_log = self.extract(self.log_betas, i, x.shape)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        elif model_output.shape[1] == C:  # fixed-large variance (learn_sigma=False)
            eps = model_output
            fixed = np.append(self.posterior_log_variance_clipped[1], self.log_betas[1:]) if self.num_steps > 1 \
                else self.log_betas
            log_variance = self.extract(fixed, i, x.shape)
        else:
            raise ConfigError(f"model output has {model_output.shape[1]} channels; expected {C} or {2 * C}.")
        xstart = self.predict_xstart(x, i, eps)
        mean = self.extract(self.posterior_mean_coef1, i, x.shape) * xstart + self.extract(
            self.posterior_mean_coef2, i, x.shape) * x
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": xstart}
