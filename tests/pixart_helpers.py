"""A tiny random PixArt-alpha (diffusers' ``PixArtTransformer2DModel``) and the sampling loop of ToCa's PixArt
reference (DPM-Solver++ multistep, order 2), shared by tests/test_toca_pixart_reference.py and
benchmarks/pixart_toca_parity.py (which runs the same model in the reference code to record the fixture)."""

from __future__ import annotations

import numpy as np
import torch
from helpers import randomize_fan_in

from stepcache.core.context import StepContext
from stepcache.diffusion.discrete_vp import DiscreteVPSchedule

TINY = dict(depth=28, hidden=32, heads=2, side=16, patch=2, caption_channels=32, text_len=12)  # 8 x 8 tokens
STEPS, CFG = 20, 4.5


def tiny_pixart(seed: int = 0, embed_scale: float = 0.1):
    """PixArt-alpha blocks (adaLN-single, self-attention, un-gated cross-attention, MLP) with every parameter
    re-drawn: fan-in scaled weights (the reference zero-initialises the cross-attention outputs and the final
    layer), small biases, ``scale_shift_table`` of std 1/sqrt(D). ``embed_scale`` shrinks the patch embedding:
    the latents of a random model reach ~1e3 at the last steps and the cross-attention, which reads the
    residual stream without a norm, would turn one-hot (equal entropies: exact ties in ToCa's top-k)."""
    from diffusers import PixArtTransformer2DModel

    c = TINY
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(num_attention_heads=c["heads"], attention_head_dim=c["hidden"] // c["heads"],
                                     in_channels=4, out_channels=8, num_layers=c["depth"],
                                     cross_attention_dim=c["hidden"], caption_channels=c["caption_channels"],
                                     sample_size=c["side"], patch_size=c["patch"], norm_type="ada_norm_single",
                                     use_additional_conditions=False, norm_elementwise_affine=False, norm_eps=1e-6)
    randomize_fan_in(model, seed, bias_std=0.05)  # PixArt's LayerNorms have no gains
    with torch.no_grad():
        model.pos_embed.proj.weight.mul_(embed_scale)
    return model.eval()


def null_caption(seed: int = 0) -> torch.Tensor:
    """The reference's learned null caption (L, C) (``y_embedder.y_embedding``): the uncond text under CFG."""
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(TINY["text_len"], TINY["caption_channels"], generator=g) / TINY["caption_channels"] ** 0.5


def pixart_inputs(lengths=(9,), seed: int = 1, text_len: int = TINY["text_len"],
                  channels: int = TINY["caption_channels"], side: int = TINY["side"]):
    """Noise (B, 4, H, W), caption features (B, 1, L, C) and the T5-style 0/1 mask (B, L) of each prompt
    (the tiny model's sizes unless given)."""
    g = torch.Generator().manual_seed(seed)
    B, L, C = len(lengths), text_len, channels
    noise = torch.randn(B, 4, side, side, generator=g)
    text = torch.randn(B, 1, L, C, generator=g)
    mask = torch.zeros(B, L, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return noise, text, mask


def linear_schedule() -> DiscreteVPSchedule:
    """PixArt's linear betas 1e-4..0.02 over 1000 steps, the tables as the reference builds them: log alpha in
    float64, then float32, and the time knots ``linspace(0, 1, 1001)[1:]``."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    schedule = DiscreteVPSchedule(betas)
    schedule.log_alpha_grid = (0.5 * torch.log(1 - torch.tensor(betas)).cumsum(dim=0)).float()
    schedule.t_grid = torch.linspace(0.0, 1.0, 1001)[1:]
    return schedule


def dpm_solver_2m(eps_fn, x: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    """The reference's DPM-Solver++ (multistep, order 2, time-uniform t from 1 to 1e-3, data prediction):
    one first-order step, then second-order steps from the last two predictions, no final evaluation.
    ``eps_fn(x, t_model, p)`` is the guided noise prediction at model time ``(t - 1/1000) * 1000``, step p."""
    ns = linear_schedule()
    grid = torch.linspace(1.0, 1e-3, steps + 1)

    def x0(x, p):
        t = grid[p].reshape(1)
        eps = eps_fn(x, (t.expand(x.shape[0]) - 1.0 / 1000) * 1000.0, p)
        return (x - ns.sigma(t) * eps) / ns.alpha(t)

    prev = [x0(x, 0)]
    for p in range(1, steps + 1):
        s, t = grid[p - 1].reshape(1), grid[p].reshape(1)
        lam_s, lam_t = ns.lambda_(s), ns.lambda_(t)
        h = lam_t - lam_s
        phi = torch.expm1(-h)
        alpha_t, ratio = torch.exp(ns.log_alpha(t)), ns.sigma(t) / ns.sigma(s)
        if p == 1:
            x = ratio * x - alpha_t * phi * prev[-1]
        else:
            r0 = (lam_s - ns.lambda_(grid[p - 2].reshape(1))) / h
            d1 = (1.0 / r0) * (prev[-1] - prev[-2])
            x = ratio * x - (alpha_t * phi) * prev[-1] - 0.5 * (alpha_t * phi) * d1
        if p < steps:
            prev = [prev[-1], x0(x, p)]
    return x


def guided_eps(transformer, text, null, mask, cfg: float = CFG, handle=None, steps: int = STEPS):
    """``eps_fn`` for :func:`dpm_solver_2m`: the [uncond; cond] batch (the null caption read under the cond
    prompt's mask, as the reference does), learned variance dropped, CFG on all four channels; with a
    stepcache handle the run starts at step 0 and each call sets the clock (i counts down)."""
    y = torch.cat([null[None, None].expand(text.shape[0], -1, -1, -1), text]).squeeze(1)  # (2B, L, C)
    mask2 = mask.repeat(2, 1)

    def eps_fn(x, t, p):
        rows = 2 * x.shape[0]
        if handle is not None:
            if p == 0:
                handle.begin_run(steps, rows, cfg=True, uncond_first=True)
            handle.set_step(StepContext(i=steps - 1 - p, num_steps=steps, t=float(t[0])))
        out = transformer(torch.cat([x, x]), encoder_hidden_states=y, timestep=torch.cat([t, t]),
                          encoder_attention_mask=mask2, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        uncond, cond = out.sample.chunk(2, dim=1)[0].chunk(2)
        return uncond + cfg * (cond - uncond)

    return eps_fn
