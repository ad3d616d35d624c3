"""``stepcache.sample``: DiT's sampling loop with the clock published to the caching runtime."""

from __future__ import annotations

import contextlib
import math
from functools import partial

import torch

from stepcache.diffusion.schedule import Diffusion
from stepcache.errors import ConfigError
from stepcache.core.context import StepContext
from stepcache.api import apply, get_handle
from stepcache.sampling import solver_sample
from stepcache.sampling.guidance import guided_forward
from stepcache.sampling.precision import at_boundary, model_dtype, state_dtype
from stepcache.sampling.samplers import SAMPLERS


def _check(model, noise: torch.Tensor, labels: torch.Tensor, num_steps: int, sampler: str, cfg_scale: float,
           guide_channels) -> int:
    if sampler not in SAMPLERS:
        raise ConfigError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}, rflow.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
    if not math.isfinite(cfg_scale) or cfg_scale < 1.0:  # NaN compares False: it would sample unguided
        raise ConfigError(f"cfg_scale must be a finite number >= 1 (1 disables guidance), got {cfg_scale}.")
    cfg = getattr(model, "config", None)
    if noise.dim() != 4:
        raise ConfigError(f"noise must have shape (n, C, H, W), got {tuple(noise.shape)}.")
    if cfg is not None and hasattr(cfg, "input_size"):
        want = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if tuple(noise.shape[1:]) != want:
            raise ConfigError(f"noise has shape {tuple(noise.shape[1:])} per sample but the model expects {want}.")
        if labels.shape != (noise.shape[0],):
            raise ConfigError(f"labels must have shape ({noise.shape[0]},), got {tuple(labels.shape)}.")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes):
            raise ConfigError(f"class labels must lie in 0..{cfg.num_classes - 1}.")
        if cfg_scale > 1.0 and cfg.class_dropout_prob <= 0:
            raise ConfigError("classifier-free guidance needs a model trained with label dropout (a null label).")
    if guide_channels is None:  # DiT's quirk: the first 3 channels (all of them for smaller models)
        guide_channels = min(3, noise.shape[1])
    channels = noise.shape[1] if guide_channels == "all" else int(guide_channels)
    if not 1 <= channels <= noise.shape[1]:
        raise ConfigError(f"guide_channels must be 'all' or 1..{noise.shape[1]}, got {guide_channels!r}.")
    return channels


@torch.no_grad()
def sample(model, noise: torch.Tensor, labels: torch.Tensor, num_steps: int = 250, sampler: str = "ddpm",
           cfg_scale: float = 1.5, policy=None, *, guide_channels=None, generator: torch.Generator | None = None,
           progress: bool = False, return_stats: bool = False, **video):
    """Sample latents of the n conditional samples; ``noise`` (n, C, H, W), ``labels`` (n,).

    With ``cfg_scale > 1`` the batch is ``[cond; uncond]`` (2n rows) as in DiT, guided on the first
    ``guide_channels`` channels (default: DiT's 3, or all of a model with fewer; ``"all"`` for all). ``policy`` (e.g.
    ``FORA(3)``) is applied for this call and removed afterwards; a handle already installed with
    ``stepcache.apply`` is driven as well. Per-step noise comes from the global torch RNG unless a
    ``generator`` is given.

    ``sampler="rflow"`` is OpenSora's rectified flow for text-to-video models (:mod:`stepcache.sampling.rflow`):
    ``labels`` are then the T5 features (n, 1, L, C) and ``video`` takes ``mask``, ``height``, ``width``,
    ``num_frames`` and ``fps``.
    """
    if sampler == "rflow":
        from stepcache.sampling.rflow import VIDEO_OPTIONS, rflow_sample

        unknown = sorted(set(video) - set(VIDEO_OPTIONS))
        if unknown:
            raise ConfigError(f"Unknown rflow option(s) {', '.join(unknown)}; choose from {', '.join(VIDEO_OPTIONS)}.")
        return rflow_sample(model, noise, labels, num_steps, cfg_scale, policy, progress=progress,
                            return_stats=return_stats, **video)
    if video:
        raise ConfigError(f"sampler {sampler!r} takes no {', '.join(sorted(video))}; those are for 'rflow'.")
    if solver_sample.handles(model, sampler):  # DPM-Solver++(2S), and U-ViT under any sampler
        return solver_sample.sample_family(model, noise, labels, num_steps, sampler, cfg_scale, policy,
                                           guide_channels=guide_channels, generator=generator, progress=progress,
                                           return_stats=return_stats)
    channels = _check(model, noise, labels, num_steps, sampler, cfg_scale, guide_channels)
    if isinstance(generator, (list, tuple)) and len(generator) != noise.shape[0]:
        raise ConfigError(f"generator must be one generator or a list of one per sample ({noise.shape[0]}), "
                          f"got a list of {len(generator)}.")
    step = SAMPLERS[sampler]
    diffusion = Diffusion(num_steps)
    use_cfg = cfg_scale > 1.0
    n = noise.shape[0]
    state = state_dtype(noise)  # the sampler works in float32 (or wider); the model in its own dtype
    x, y = noise.to(state), labels
    if use_cfg:
        null = getattr(model, "num_classes", 1000)
        x = torch.cat([x, x], dim=0)
        y = torch.cat([labels, torch.full_like(labels, null)], dim=0)
        model_fn = partial(guided_forward, model, cfg_scale=cfg_scale, channels=channels)
    else:
        model_fn = model
    model_fn = at_boundary(model_fn, model_dtype(model), state)

    with contextlib.ExitStack() as stack:
        if policy is not None:
            stack.enter_context(apply(model, policy))
        handle = get_handle(model)
        if handle is not None:
            handle.begin_run(num_steps, x.shape[0], cfg=use_cfg)
            stack.callback(handle.end_run)
        indices = range(num_steps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc=f"{sampler}-{num_steps}", leave=False)
        for i in indices:
            it = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            t = diffusion.model_timesteps(it)
            if handle is not None:
                handle.set_step(StepContext(i=i, num_steps=num_steps, t=float(diffusion.timestep_map[i])))
            out = model_fn(x, t, y)
            x = step(diffusion, out, x, it, generator)
        stats = handle.stats() if handle is not None else None
    latents = x[:n].to(noise.dtype)
    return (latents, stats) if return_stats else latents
