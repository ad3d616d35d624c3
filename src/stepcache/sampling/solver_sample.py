"""Sampling loops beyond DiT's own: DPM-Solver++(2S) for DiT and U-ViT, and DDPM/DDIM for U-ViT.

``stepcache.sample`` hands these cases here. What differs by model family is kept in two small places:

- the model's time input. Both families are trained on 1000 discrete steps, but U-ViT feeds the
  step number n = 1..1000 (n steps of noise), DiT the index n - 1; on DPM-Solver's continuous grid
  (``t_n = n / 1000``) U-ViT gets ``1000 t`` (fractional at midpoints, never rounded), DiT
  ``1000 (t - 1/1000)``;
- classifier-free guidance. U-ViT's reference guides all channels with ``cond + (s - 1)(cond - uncond)``
  (its "scale 0.4" is ``cfg_scale=1.4``), from one batched call over ``[cond; uncond]`` rows (the
  reference makes two calls; the batched call stays within float rounding of it, see
  benchmarks/uvit_parity.py); DiT keeps its own form (``guided_forward``: 3 channels by default).

The clock: before every model call the caching runtime is told the step ``i = N - 1 - j`` (counting
down as DiT's loops do), and for DPM-Solver the ``stage`` (0: start of step j, 1: its midpoint).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from stepcache.diffusion.discrete_vp import DiscreteVPSchedule, scaled_linear_betas
from stepcache.diffusion.schedule import Diffusion, linear_betas
from stepcache.errors import ConfigError, UnsupportedModelError
from stepcache.models.dit import DiT
from stepcache.models.uvit import UViT
from stepcache.core.context import StepContext
from stepcache.adapters.base import unwrap_compiled
from stepcache.api import apply, get_handle
from stepcache.sampling.dpm_solver import data_prediction, dpm_solver_2s
from stepcache.sampling.guidance import guided_forward
from stepcache.sampling.precision import at_boundary, model_dtype, state_dtype
from stepcache.sampling.samplers import SAMPLERS

SOLVERS = ("dpm-solver++2s",)


def _is_uvit(model) -> bool:
    return isinstance(unwrap_compiled(model), UViT)  # a torch.compile wrapper samples as the model inside


def handles(model, sampler: str) -> bool:
    """Whether ``stepcache.sample`` should run this (model, sampler) pair here."""
    return sampler in SOLVERS or _is_uvit(model)


class ScaledLinearDiffusion(Diffusion):
    """DiT's respaced DDPM tables on Stable Diffusion's betas (what U-ViT's latent models train on)."""

    def base_betas(self) -> np.ndarray:
        return scaled_linear_betas()


# ---------------------------------------------------------------------------------------------- checks
def _check(model, noise, labels, num_steps, sampler, cfg_scale) -> None:
    if sampler not in SOLVERS and sampler not in SAMPLERS:
        raise ConfigError(f"Unknown sampler {sampler!r}; choose one of {', '.join([*SAMPLERS, *SOLVERS])}.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
    if cfg_scale < 1.0:
        raise ConfigError(f"cfg_scale must be >= 1 (1 disables guidance), got {cfg_scale}.")
    if noise.dim() != 4:
        raise ConfigError(f"noise must have shape (n, C, H, W), got {tuple(noise.shape)}.")
    if not isinstance(unwrap_compiled(model), (UViT, DiT)):
        raise UnsupportedModelError(f"{sampler} sampling supports stepcache's DiT and UViT, not "
                                    f"{type(model).__name__}.")
    if _is_uvit(model):
        c = model.config
        want, classes = (c.in_chans, c.img_size, c.img_size), model.num_classes - 1  # last row: null label
        if model.num_classes <= 0 and cfg_scale > 1.0:
            raise ConfigError("classifier-free guidance needs a class-conditional U-ViT.")
    else:
        c = model.config
        want, classes = (c.in_channels, c.input_size, c.input_size), c.num_classes
        if cfg_scale > 1.0 and c.class_dropout_prob <= 0:
            raise ConfigError("classifier-free guidance needs a model trained with label dropout (a null label).")
    if tuple(noise.shape[1:]) != want:
        raise ConfigError(f"noise has shape {tuple(noise.shape[1:])} per sample but the model expects {want}.")
    if labels is not None and classes > 0:
        if labels.shape != (noise.shape[0],):
            raise ConfigError(f"labels must have shape ({noise.shape[0]},), got {tuple(labels.shape)}.")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ConfigError(f"class labels must lie in 0..{classes - 1}.")


def _channels(model, noise, guide_channels) -> int:
    """Guided channels: all for U-ViT (its reference); DiT's 3 by default, or as asked."""
    C = noise.shape[1]
    if guide_channels == "all" or (guide_channels is None and _is_uvit(model)):
        return C
    if _is_uvit(model):
        raise ConfigError("U-ViT guides all channels, as its reference; leave guide_channels unset or 'all'.")
    channels = min(3, C) if guide_channels is None else int(guide_channels)
    if not 1 <= channels <= C:
        raise ConfigError(f"guide_channels must be 'all' or 1..{C}, got {guide_channels!r}.")
    return channels


# ---------------------------------------------------------------------------------------------- family
def noise_prediction(model, labels, cfg_scale: float, channels):
    """``eps(x (B, C, H, W), t_model (B,)) -> (B, C, H, W)``, guided when ``cfg_scale > 1``."""
    if _is_uvit(model):
        y = labels if model.num_classes > 0 else None
        scale = round(cfg_scale - 1.0, 12)  # 1.4 - 1 is 0.39999999999999991; the reference multiplies by 0.4

        def eps(x, t):
            if cfg_scale <= 1.0:
                return model(x, t, y)
            null = torch.full_like(y, model.null_label)
            cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)  # (B, ...)
            return cond + scale * (cond - uncond)

        return eps
    C = model.in_channels

    def eps_dit(x, t):
        if cfg_scale <= 1.0:
            return model(x, t, labels)[:, :C]
        null = torch.full_like(labels, model.num_classes)
        out = guided_forward(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]),
                             cfg_scale=cfg_scale, channels=channels)  # (2B, C_out, H, W)
        return out[: x.shape[0], :C]

    return eps_dit


def continuous_time(model, t: torch.Tensor) -> torch.Tensor:
    """DPM-Solver's t in (0, 1] -> the model's time input (see the module docstring)."""
    if _is_uvit(model):
        return t * 1000
    return (t - 1.0 / 1000) * 1000.0


def training_schedule(model) -> DiscreteVPSchedule:
    return DiscreteVPSchedule(scaled_linear_betas() if _is_uvit(model) else linear_betas())


# ---------------------------------------------------------------------------------------------- loops
def _publish(handle, j: int, num_steps: int, t_model: torch.Tensor, stage: int = 0) -> None:
    if handle is not None:
        handle.set_step(StepContext(i=num_steps - 1 - j, num_steps=num_steps, t=float(t_model[0]), stage=stage))


def _solver_loop(model, eps, x, num_steps, handle, progress):
    schedule = training_schedule(model)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * num_steps, desc=f"dpm-solver++2s-{num_steps}", leave=False)

    def eps_at(x_, t, j, stage):
        t_model = continuous_time(model, t)  # (B,) float32
        _publish(handle, j, num_steps, t_model, stage)
        if bar is not None:
            bar.update(1)
        return eps(x_, t_model)

    try:
        return dpm_solver_2s(data_prediction(eps_at, schedule), schedule, x, num_steps)
    finally:
        if bar is not None:
            bar.close()


def _ddpm_loop(model, eps, x, num_steps, sampler, handle, generator):
    """U-ViT under DDPM/DDIM on its own (scaled-linear) schedule; the model gets n = index + 1."""
    diffusion = ScaledLinearDiffusion(num_steps)
    step = SAMPLERS[sampler]
    for i in range(num_steps - 1, -1, -1):
        it = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        t_model = diffusion.model_timesteps(it) + 1
        if handle is not None:
            handle.set_step(StepContext(i=i, num_steps=num_steps, t=float(t_model[0])))
        x = step(diffusion, eps(x, t_model), x, it, generator)
    return x


@torch.no_grad()
def sample_family(model, noise: torch.Tensor, labels: torch.Tensor | None, num_steps: int, sampler: str,
                  cfg_scale: float, policy=None, *, guide_channels=None, generator=None, progress: bool = False,
                  return_stats: bool = False):
    """``stepcache.sample`` for DPM-Solver++(2S) (``num_steps`` solver steps = 2 x num_steps model
    evaluations) and for U-ViT; same arguments and return value."""
    _check(model, noise, labels, num_steps, sampler, cfg_scale)
    eps = noise_prediction(model, labels, cfg_scale, _channels(model, noise, guide_channels))
    state = state_dtype(noise)  # the solver works in float32 (or wider); the model in its own dtype
    eps = at_boundary(eps, model_dtype(model), state)
    cfg, solver = cfg_scale > 1.0, sampler in SOLVERS
    with contextlib.ExitStack() as stack:
        if policy is not None:
            stack.enter_context(apply(model, policy))
        handle = get_handle(model)
        if handle is not None:
            handle.begin_run(num_steps, noise.shape[0] * (2 if cfg else 1), cfg=cfg, stages=2 if solver else 1)
            stack.callback(handle.end_run)
        if solver:
            x = _solver_loop(model, eps, noise.to(state), num_steps, handle, progress)
        else:
            x = _ddpm_loop(model, eps, noise.to(state), num_steps, sampler, handle, generator)
        stats = handle.stats() if handle is not None else None
    x = x.to(noise.dtype)
    return (x, stats) if return_stats else x
