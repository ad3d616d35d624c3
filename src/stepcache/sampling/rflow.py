"""OpenSora v1.2's rectified-flow sampler (Liu et al., "Flow Straight and Fast", arXiv 2209.03003; OpenSora's
``schedulers/rf``), with the clock published to the caching runtime.

The model predicts the velocity v = x0 - noise of x_t = (1 - t/1000) x0 + (t/1000) noise. Sampling takes S
Euler steps on continuous timesteps t_k = (1 - k/S) * 1000, k = 0..S-1 (t = 0 is never evaluated), each
moved by OpenSora's resolution- and length-dependent transform (:func:`timestep_transform`). Classifier-free
guidance batches ``[cond; uncond]``; the uncond text is the model's learned null caption read under the COND
prompt's mask (a quirk of the reference: only its first L rows are used), and guidance acts on the first
``in_channels`` output channels (the velocity; the rest is a learned-sigma leftover).

The runtime's clock counts down (``StepContext.i = S - 1 - k``) as for every sampler; ToCa's OpenSora variant
counts its step ``k`` up from it.
"""

from __future__ import annotations

import contextlib

import torch

from stepcache.errors import ConfigError
from stepcache.core.context import StepContext
from stepcache.api import apply, get_handle

NUM_TIMESTEPS = 1000
BASE_RESOLUTION = 512 * 512
VIDEO_OPTIONS = ("mask", "height", "width", "num_frames", "fps", "use_timestep_transform")


def timestep_transform(t: torch.Tensor, height: torch.Tensor, width: torch.Tensor, num_frames: torch.Tensor,
                       num_timesteps: int = NUM_TIMESTEPS) -> torch.Tensor:
    """u' = r u / (1 + (r - 1) u) with u = t / 1000, r = sqrt(h w / 512^2) * sqrt(F), F = num_frames // 17 * 5
    (1 for images). Reference quirk kept: 1 < num_frames < 17 gives F = 0, r = 0: the first timestep is
    0 / 0 = NaN and all others 0 (:func:`rflow_sample` refuses such runs)."""
    height, width, num_frames = (v.float() if v.dtype == torch.float16 else v for v in (height, width, num_frames))
    u = t / num_timesteps
    ratio_space = (height * width / BASE_RESOLUTION).sqrt()
    frames = torch.ones_like(num_frames) if num_frames[0] == 1 else num_frames // 17 * 5
    ratio = ratio_space * (frames / 1).sqrt() * 1.0
    return ratio * u / (1 + (ratio - 1) * u) * num_timesteps


def timesteps(num_steps: int, n: int, height, width, num_frames, transform: bool = True, device=None) -> list:
    """The S timesteps of a run, each a (n,) tensor, transformed unless ``transform=False``."""
    out = [torch.tensor([(1.0 - k / num_steps) * NUM_TIMESTEPS] * n, device=device) for k in range(num_steps)]
    return [timestep_transform(t, height, width, num_frames) for t in out] if transform else out


def _as_rows(value, n: int, name: str, device) -> torch.Tensor:
    """A python number or an (n,) / (1,) tensor -> (n,) tensor (kept in its dtype, as the reference uses it)."""
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"rflow sampling needs {name} (a number or an (n,) tensor).")
    t = value if isinstance(value, torch.Tensor) else torch.tensor([float(value)], device=device)
    t = t.reshape(-1)
    if t.shape[0] == 1:
        t = t.repeat(n)
    if t.shape[0] != n:
        raise ConfigError(f"{name} must have one value per sample ({n}), got shape {tuple(value.shape)}.")
    return t


def check_inputs(model, noise: torch.Tensor, text: torch.Tensor, mask, num_steps: int, cfg_scale: float) -> None:
    null = getattr(getattr(model, "y_embedder", None), "y_embedding", None)
    if null is None:
        raise ConfigError("sampler='rflow' needs a text-to-video model with a learned null caption (STDiT3).")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
    if cfg_scale < 1.0:
        raise ConfigError(f"cfg_scale must be >= 1 (1 disables guidance), got {cfg_scale}.")
    if noise.dim() != 5 or noise.shape[1] != model.in_channels:
        raise ConfigError(f"noise must have shape (n, {model.in_channels}, T, H, W), got {tuple(noise.shape)}.")
    want = (noise.shape[0], 1) + tuple(null.shape)
    if tuple(text.shape) != want:
        raise ConfigError(f"text_embeds must have shape {want} (T5 features padded to the model's "
                          f"{null.shape[0]} tokens), got {tuple(text.shape)}.")
    if mask is not None and tuple(mask.shape) != (noise.shape[0], null.shape[0]):
        raise ConfigError(f"mask must have shape ({noise.shape[0]}, {null.shape[0]}), got {tuple(mask.shape)}.")
    if mask is not None and bool((mask.sum(dim=1) == 0).any()):
        raise ConfigError("every mask row needs at least one text token.")


@torch.no_grad()
def rflow_sample(model, noise: torch.Tensor, text_embeds: torch.Tensor, num_steps: int = 30,
                 cfg_scale: float = 7.0, policy=None, *, mask: torch.Tensor | None = None, height=None, width=None,
                 num_frames=None, fps=24, use_timestep_transform: bool = True, progress: bool = False,
                 return_stats: bool = False):
    """Latents (n, C, T, H, W) from ``noise`` (n, C, T, H, W), T5 features ``text_embeds`` (n, 1, L, C_text)
    with their ``mask`` (n, L), pixel ``height``/``width``, pixel ``num_frames`` and ``fps`` (numbers or (n,)
    tensors). ``policy`` is applied for this call; a handle installed with ``stepcache.apply`` is driven too."""
    check_inputs(model, noise, text_embeds, mask, num_steps, cfg_scale)
    n, device = noise.shape[0], noise.device
    height, width, num_frames, fps = (_as_rows(v, n, name, device) for v, name in
                                      ((height, "height"), (width, "width"), (num_frames, "num_frames"), (fps, "fps")))
    if use_timestep_transform and bool(((num_frames > 1) & (num_frames < 17)).any()):
        raise ConfigError("OpenSora's timestep transform degenerates for 2..16 frames (first timestep NaN); use 1 "
                          "or >= 17 frames, or use_timestep_transform=False.")
    steps = timesteps(num_steps, n, height, width, num_frames, use_timestep_transform, device)
    use_cfg = cfg_scale > 1.0
    y = text_embeds
    if use_cfg:
        null = model.y_embedder.y_embedding[None].repeat(n, 1, 1)[:, None]  # (n, 1, L, C_text)
        y = torch.cat([text_embeds, null.to(text_embeds.dtype)], dim=0)
    kwargs = dict(mask=mask, fps=fps, height=height, width=width)
    channels = model.in_channels
    z = noise
    with contextlib.ExitStack() as stack:
        if policy is not None:
            stack.enter_context(apply(model, policy))
        handle = get_handle(model)
        rows = 2 * n if use_cfg else n
        if handle is not None:
            handle.begin_run(num_steps, rows, cfg=use_cfg)
            stack.callback(handle.end_run)
        order = range(num_steps)
        if progress:
            from tqdm.auto import tqdm

            order = tqdm(order, desc=f"rflow-{num_steps}", leave=False)
        for k in order:
            t = steps[k]
            if handle is not None:
                handle.set_step(StepContext(i=num_steps - 1 - k, num_steps=num_steps, t=float(t[0])))
            if use_cfg:
                out = model(torch.cat([z, z], 0), torch.cat([t, t], 0), y, **kwargs)[:, :channels]
                cond, uncond = out.chunk(2, dim=0)
                v = uncond + cfg_scale * (cond - uncond)
            else:
                v = model(z, t, y, **kwargs)[:, :channels]
            dt = (steps[k] - steps[k + 1] if k < num_steps - 1 else steps[k]) / NUM_TIMESTEPS
            z = z + v * dt[:, None, None, None, None]
        stats = handle.stats() if handle is not None else None
    return (z, stats) if return_stats else z
