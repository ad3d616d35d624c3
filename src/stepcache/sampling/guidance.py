"""Classifier-free guidance the way DiT does it (Ho & Salimans, arXiv 2207.12598).

One forward over ``[x_cond; x_cond]`` with labels ``[y; null]`` (the uncond half of the state is
replaced by the cond half, as DiT's ``forward_with_cfg`` does); guidance
``eps = uncond + s * (cond - uncond)`` on the first ``channels`` output channels (3 by default,
a quirk of the published FID numbers), written into both halves; other channels stay per half.
"""

from __future__ import annotations

import torch


def guided_forward(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                   channels: int = 3) -> torch.Tensor:
    n = x.shape[0] // 2
    half = x[:n]
    out = model(torch.cat([half, half], dim=0), t, y)  # (2n, C_out, H, W)
    eps, rest = out[:, :channels], out[:, channels:]
    cond, uncond = torch.split(eps, n, dim=0)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)
