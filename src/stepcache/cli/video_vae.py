"""Decoding STDiT3 latents for ``stepcache sample --model STDiT3-... --vae VAE``: a documented substitute.

OpenSora v1.2 decodes with two stages: SDXL's 2-D VAE (x8 in space) under its own temporal VAE (17 frames ->
5 latents, with a per-channel shift and scale). The temporal VAE is not available offline and is not in
diffusers, so stepcache decodes with the spatial stage only: a diffusers ``AutoencoderKL`` (a folder or a hub
id, e.g. the SDXL VAE ``stabilityai/sdxl-vae``) applied to every latent frame. The result has the latent frame
count T' (not the pixel frame count) and, on real OpenSora latents, is a preview of their content rather than
OpenSora's video (the temporal VAE's latent space is not the 2-D VAE's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stepcache.errors import ConfigError


def load_vae(spec: str, device: torch.device, dtype: torch.dtype):
    """A diffusers ``AutoencoderKL`` from a folder, or a hub id (the local cache first, then the Hub)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ConfigError("--vae needs diffusers: pip install 'stepcache[diffusers]'.") from None
    from stepcache.cli.common import hub_reachable

    local = Path(spec).expanduser()
    try:
        if local.exists():
            vae = AutoencoderKL.from_pretrained(local)
        else:
            try:
                vae = AutoencoderKL.from_pretrained(spec, local_files_only=True)
            except Exception:
                if not hub_reachable():
                    raise ConfigError(f"The VAE {spec!r} is neither a folder nor cached locally, and the Hugging "
                                      "Face Hub cannot be reached.") from None
                vae = AutoencoderKL.from_pretrained(spec)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"Cannot load a diffusers AutoencoderKL from {spec!r} ({type(exc).__name__}).") from None
    return vae.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def decode_per_frame(vae, latents: torch.Tensor, chunk: int = 8) -> np.ndarray:
    """uint8 videos (n, T', H*f, W*f, 3) from latents (n, C, T', H, W): every latent frame through the 2-D VAE
    (``z / scaling_factor + shift_factor``), ``chunk`` frames at a time."""
    n, C, T = latents.shape[:3]
    if C != vae.config.latent_channels:
        raise ConfigError(f"The VAE takes {vae.config.latent_channels} latent channels, the latents have {C}.")
    param = next(vae.parameters())
    frames = latents.permute(0, 2, 1, 3, 4).reshape(n * T, C, *latents.shape[-2:])  # (n*T', C, H, W)
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for start in range(0, frames.shape[0], chunk):
        z = frames[start:start + chunk].to(device=param.device, dtype=param.dtype) / scale + shift
        out.append(vae.decode(z).sample.float().cpu())  # (k, 3, H*f, W*f) in [-1, 1]
    pixels = torch.cat(out).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return pixels.view(n, T, *pixels.shape[1:]).permute(0, 1, 3, 4, 2).numpy()  # (n, T', H*f, W*f, 3)
