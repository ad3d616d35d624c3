"""The peers of ``bench_frontier.py``: diffusers' cache hooks and cache-dit on the converted DiT, under DiT's sampler.

Every peer runs on a fresh ``copy.deepcopy`` of the converted ``DiTTransformer2DModel`` (so no hook outlives its
run) wrapped by :class:`DiffusersDenoiser`, a ``model(x, t, y) -> eps`` callable that ``stepcache.sample`` drives
exactly like the native DiT: same respaced DDIM grid, same batched CFG rows, same seeds.

Work is counted by :class:`BlockMeter`: forward hooks on modules that run only when a branch is really computed
(diffusers: ``attn1.to_q`` and ``ff.net.0.proj``; native: ``attn.qkv`` and ``mlp.fc1``). A hook sees the rows and
tokens the branch processed; work = rows x stepcache's MACs for that many tokens (``dit_macs``), so peers and
stepcache are counted with the same formula. A cache hook that returns a stored or forecast tensor never calls
these modules; a FasterCache step that drops the unconditional rows is counted with half the rows. Indicator and
forecast arithmetic is not block work and is not counted (it shows in the measured time).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from stepcache.adapters.dit import dit_macs


# ------------------------------------------------------------------------------ work
class BlockMeter:
    """Executed block MACs of a DiT (native or diffusers), from hooks on branch-only modules."""

    def __init__(self, model, native_model):
        macs = dit_macs(native_model)
        T = native_model.num_tokens
        self.attn_per_token = macs["attn"](T) / T
        self.mlp_per_token = macs["mlp"](T) / T
        self.macs = 0.0
        self.calls = {"attn": 0, "mlp": 0}
        self.per_call: list[float] = []  # block MACs of each model call, closed by mark()
        self._mark = 0.0
        self._handles = []
        for attn, mlp in branch_modules(model):
            self._handles.append(attn.register_forward_hook(self._hook("attn", self.attn_per_token)))
            self._handles.append(mlp.register_forward_hook(self._hook("mlp", self.mlp_per_token)))

    def _hook(self, branch: str, per_token: float):
        def hook(_module, inputs, _out):
            x = inputs[0]  # (rows, tokens, D)
            self.macs += x.shape[0] * x.shape[1] * per_token
            self.calls[branch] += 1

        return hook

    def mark(self) -> None:
        """Close the current model call's tally (called by the denoiser after each call)."""
        self.per_call.append(self.macs - self._mark)
        self._mark = self.macs

    def reset(self) -> None:
        self.macs, self._mark, self.per_call, self.calls = 0.0, 0.0, [], {"attn": 0, "mlp": 0}

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def branch_modules(model) -> list[tuple]:
    """(attention-only module, MLP-only module) per block of a native or diffusers DiT."""
    if hasattr(model, "transformer_blocks"):
        return [(b.attn1.to_q, b.ff.net[0].proj) for b in model.transformer_blocks]
    return [(b.attn.qkv, b.mlp.fc1) for b in model.blocks]


def uncached_block_macs(native_model, num_steps: int, rows: int) -> float:
    """Block MACs of an uncached run: steps x rows x depth x (attention + MLP over all tokens)."""
    macs = dit_macs(native_model)
    T = native_model.num_tokens
    return float(num_steps * rows * len(native_model.blocks) * (macs["attn"](T) + macs["mlp"](T)))


# ------------------------------------------------------------------------------ the denoiser wrapper
class DiffusersDenoiser:
    """``DiTTransformer2DModel`` as ``model(x, t, y) -> output`` for ``stepcache.sample``.

    ``context``: a diffusers cache-context name set before EVERY call (FirstBlockCache, TaylorSeer and FasterCache
    key their state by it and raise without one; the DiT pipeline of diffusers sets none). ``uncond_first``: feed
    the CFG halves as [uncond; cond] (FasterCache's layout) and restore DiT's [cond; uncond] order on the way out.
    ``timestep`` holds the current original timestep for the peers that ask for it through a callback.
    """

    def __init__(self, transformer, num_classes: int, context: str | None = None, uncond_first: bool = False):
        self.transformer = transformer
        self.num_classes = num_classes
        self.context = context
        self.uncond_first = uncond_first
        self.timestep = 999
        self.meter: BlockMeter | None = None  # told when each call ends

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        self.timestep = int(t.reshape(-1)[0])
        if self.context is not None:
            _set_cache_context(self.transformer, CacheContext(self.context))
        if self.uncond_first:
            x, t, y = (torch.cat(v.chunk(2)[::-1]) for v in (x, t, y))
        out = self.transformer(hidden_states=x, timestep=t, class_labels=y, return_dict=False)[0]
        if self.meter is not None:
            self.meter.mark()
        return torch.cat(out.chunk(2)[::-1]) if self.uncond_first else out


# ------------------------------------------------------------------------------ peers
@dataclass
class Installed:
    """A peer ready to sample: the callable, a per-run reset, a remover, and a summary of its decisions."""

    denoiser: DiffusersDenoiser
    reset: Callable[[], None]
    remove: Callable[[], None] = lambda: None
    summary: Callable[[], dict] = field(default=lambda: {})


def _diffusers_reset(tr) -> Callable[[], None]:
    from diffusers.hooks import HookRegistry

    def reset():
        registry = HookRegistry.check_if_exists_or_initialize(tr)
        registry.reset_stateful_hooks(recurse=True)

    return reset


def _registered(tr) -> None:
    """Hooks were added below the transformer after its registry was made: let it find them."""
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(tr).invalidate_child_registries_cache()


TAYLORSEER_MODULES = {
    # diffusers' default identifiers match modules named "...attn" (fullmatch): on DiT (attn1) they hook nothing.
    "attn": [r"transformer_blocks\.\d+\.attn1"],
    "attn+ff": [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"],
}


def install_peer(kind: str, params: dict, base, num_classes: int, num_steps: int) -> Installed:
    """Install peer ``kind`` with ``params`` on a deep copy of the converted transformer ``base``."""
    tr = copy.deepcopy(base)
    return PEERS[kind](tr, dict(params), num_classes, num_steps)


def _fbcache(tr, p, num_classes, num_steps):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    apply_first_block_cache(tr, FirstBlockCacheConfig(threshold=p["threshold"]))
    _registered(tr)
    return Installed(DiffusersDenoiser(tr, num_classes, context="cond_uncond"), _diffusers_reset(tr))


def _taylorseer(tr, p, num_classes, num_steps):
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    config = TaylorSeerCacheConfig(cache_interval=p["interval"], max_order=p["order"],
                                   disable_cache_before_step=p.get("warmup", 3), taylor_factors_dtype=torch.float32,
                                   cache_identifiers=TAYLORSEER_MODULES[p.get("modules", "attn+ff")])
    apply_taylorseer_cache(tr, config)
    _registered(tr)
    return Installed(DiffusersDenoiser(tr, num_classes, context="cond_uncond"), _diffusers_reset(tr))


def _magcache(tr, p, num_classes, num_steps):
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    config = MagCacheConfig(threshold=p["threshold"], max_skip_steps=p.get("max_skip_steps", 3),
                            retention_ratio=p.get("retention_ratio", 0.2), num_inference_steps=num_steps,
                            mag_ratios=p["mag_ratios"])
    apply_mag_cache(tr, config)
    _registered(tr)
    return Installed(DiffusersDenoiser(tr, num_classes, context="cond_uncond"), _diffusers_reset(tr))


def calibrate_mag_ratios(base, sample_fn: Callable, num_classes: int, num_steps: int) -> list[float]:
    """MagCache's own calibrate mode on this model: one uncached run, the ratios it prints at the end."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    tr = copy.deepcopy(base)
    apply_mag_cache(tr, MagCacheConfig(calibrate=True, num_inference_steps=num_steps))
    _registered(tr)
    den = DiffusersDenoiser(tr, num_classes, context="cond_uncond")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        sample_fn(den)
    found = re.findall(r"\[[-0-9.,eE\s]+\]", buf.getvalue())
    if not found:
        raise RuntimeError("MagCache's calibrate mode printed no ratios.")
    return [float(v) for v in ast.literal_eval(found[-1])]


def _pab(tr, p, num_classes, num_steps):
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    den = DiffusersDenoiser(tr, num_classes, context="cond_uncond")
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=p["skip"],
        spatial_attention_timestep_skip_range=tuple(p.get("range", (100, 800))),
        spatial_attention_block_identifiers=(r"transformer_blocks.*attn1",),
        current_timestep_callback=lambda: den.timestep)
    apply_pyramid_attention_broadcast(tr, config)
    _registered(tr)
    return Installed(den, _diffusers_reset(tr))


def _fastercache(tr, p, num_classes, num_steps):
    """FasterCache skips the unconditional half and approximates it in frequency space: it needs [uncond; cond]
    rows and the class labels among the inputs it halves (its default list has no ``class_labels``)."""
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache

    den = DiffusersDenoiser(tr, num_classes, context="cond_uncond", uncond_first=True)
    config = FasterCacheConfig(
        spatial_attention_block_skip_range=p.get("attn_skip", 2),
        spatial_attention_timestep_skip_range=tuple(p.get("attn_range", (-1, 681))),
        unconditional_batch_skip_range=p.get("uncond_skip", 5),
        unconditional_batch_timestep_skip_range=tuple(p.get("uncond_range", (-1, 781))),
        spatial_attention_block_identifiers=(r"transformer_blocks.*attn1",),
        attention_weight_callback=lambda _m: p.get("attn_weight", 0.3),
        tensor_format="BCHW", current_timestep_callback=lambda: den.timestep,
        _unconditional_conditional_input_kwargs_identifiers=["hidden_states", "timestep", "class_labels"])
    apply_faster_cache(tr, config)
    _registered(tr)
    return Installed(den, _diffusers_reset(tr))


def _dbcache(tr, p, num_classes, num_steps):
    """cache-dit's transformer-only path: ``num_inference_steps`` must be set; its step clock counts calls, and
    DiT batches CFG into one call per step, so one decision per sampler step (checked in ``summary``)."""
    import cache_dit
    from cache_dit import DBCacheConfig

    calibrator = None
    if p.get("taylorseer"):
        from cache_dit import TaylorSeerCalibratorConfig

        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=p.get("order", 1))
    config = DBCacheConfig(Fn_compute_blocks=p.get("Fn", 1), Bn_compute_blocks=p.get("Bn", 0),
                           residual_diff_threshold=p["threshold"], max_warmup_steps=p.get("warmup", 8),
                           num_inference_steps=num_steps)
    cache_dit.enable_cache(tr, cache_config=config, calibrator_config=calibrator)

    def summary():
        stats = cache_dit.summary(tr, details=False, logging=False)
        s = stats[0] if isinstance(stats, (list, tuple)) and stats else stats
        steps = getattr(s, "cached_steps", None)
        return {"cached_steps": sorted(int(v) for v in steps) if steps else []}

    def reset():  # a fresh context per run, with this peer's own settings (a bare num_inference_steps would
        # reload cache-dit's defaults)
        kwargs = {"cache_config": copy.deepcopy(config)}
        if calibrator is not None:
            kwargs["calibrator_config"] = copy.deepcopy(calibrator)
        cache_dit.refresh_context(tr, **kwargs)

    return Installed(DiffusersDenoiser(tr, num_classes), reset, lambda: cache_dit.disable_cache(tr), summary)


PEERS = {
    "diffusers-fbcache": _fbcache,
    "diffusers-taylorseer": _taylorseer,
    "diffusers-magcache": _magcache,
    "diffusers-pab": _pab,
    "diffusers-fastercache": _fastercache,
    "cache-dit-dbcache": _dbcache,
}
