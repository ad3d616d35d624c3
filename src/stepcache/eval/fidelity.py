"""Fidelity of cached samples to the uncached ones with the same seeds: PSNR and SSIM.

SSIM follows Wang et al., "Image quality assessment: from error visibility to structural similarity"
(IEEE TIP 2004): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, computed per channel
and averaged, in float64. Images are compared on a known data range (default [-1, 1], i.e. L = 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stepcache.errors import ConfigError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ConfigError(f"Images to compare must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.dim() != 4:
        raise ConfigError(f"Images must have shape (N, C, H, W), got {tuple(a.shape)}.")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB (N,), float64; identical images give +inf."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)  # (N,)
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised separable Gaussian kernel (size, size), float64."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window: int = SSIM_WINDOW) -> torch.Tensor:
    """Per-image mean SSIM (N,), float64, over the valid (unpadded) window positions.

    Images smaller than the window use a window the size of the image (odd, >= 3).
    """
    _check_pair(a, b)
    N, C, H, W = a.shape
    size = min(window, H - (1 - H % 2), W - (1 - W % 2))
    if size < 3:
        raise ConfigError(f"SSIM needs images of at least 3x3 pixels, got {H}x{W}.")
    sigma = SSIM_SIGMA * size / SSIM_WINDOW
    kernel = gaussian_window(size, sigma).expand(C, 1, size, size)  # (C, 1, k, k)
    x, y = a.double(), b.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=C)  # (N, C, H-k+1, W-k+1)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).flatten(1).mean(dim=1)


def fidelity(cached: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> dict:
    """Mean PSNR (dB; infinite PSNRs capped at 100) and mean SSIM of ``cached`` vs ``reference``."""
    p = psnr(cached, reference, data_range).clamp(max=100.0)
    s = ssim(cached, reference, data_range)
    value = float(p.mean())
    return {"psnr": value if math.isfinite(value) else 100.0, "ssim": float(s.mean())}
