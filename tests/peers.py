"""The peers' caches (diffusers hooks, cache-dit) run on the tiny pipelines of test_diffusers, with the
steps they computed recorded, for parity tests against stepcache's policies."""

from __future__ import annotations

import contextlib

import torch


def blocks(transformer) -> list[torch.nn.Module]:
    """Every transformer block in execution order (FLUX: double then single)."""
    out = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        out += list(getattr(transformer, name, []))
    return out


def _inner(block) -> torch.nn.Module:
    """A child that runs only when the block's own forward runs (the peers' hooks replace the forward)."""
    for name in ("attn", "attn1"):
        if hasattr(block, name):
            return getattr(block, name)
    raise AssertionError(f"no attention child in {type(block).__name__}")


@contextlib.contextmanager
def step_recorder(transformer, block_index: int = -1, module: torch.nn.Module | None = None):
    """Records, per transformer call, whether block ``block_index`` (or ``module``) really ran:
    ``rec.computed``, ``rec.calls``. One call per step for the pipelines used here (no true CFG)."""

    class Rec:
        calls = 0
        computed: list[int] = []

    rec = Rec()
    rec.computed = []

    def pre(module, args, kwargs):
        rec.calls += 1

    def ran(module, args, output):
        if not rec.computed or rec.computed[-1] != rec.calls - 1:
            rec.computed.append(rec.calls - 1)

    h1 = transformer.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = (module or _inner(blocks(transformer)[block_index])).register_forward_hook(ran)
    try:
        yield rec
    finally:
        h1.remove()
        h2.remove()


def loud(build, factor: float = 10.0):
    """``build`` with every block parameter scaled by ``factor``: the tiny test models' 0.02-std weights
    make each block's contribution so small that caching changes the latents by ~1e-7 only."""

    def build_loud():
        pipe = build()
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            for name, p in pipe.transformer.named_parameters():
                if "blocks" in name:
                    p.mul_(factor)
        return pipe

    return build_loud


def skipped(rec, steps: int) -> list[int]:
    return [s for s in range(steps) if s not in rec.computed]


def enable_peer_cache(transformer, config) -> None:
    """diffusers' hook for ``config`` on ``transformer`` (DiT's class has no ``enable_cache``: the
    apply function is called directly). Build a fresh pipeline per peer run: nothing is removed."""
    from diffusers.hooks import (FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig,
                                 apply_first_block_cache, apply_mag_cache, apply_taylorseer_cache)

    apply = {FirstBlockCacheConfig: apply_first_block_cache, MagCacheConfig: apply_mag_cache,
             TaylorSeerCacheConfig: apply_taylorseer_cache}[type(config)]
    apply(transformer, config)


@contextlib.contextmanager
def cache_context(transformer, name: str = "cond"):
    """DiT and PixArt pipelines of diffusers 0.42.1 set no cache context; FirstBlockCache needs one."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(transformer, CacheContext(name))
    try:
        yield
    finally:
        _set_cache_context(transformer, None)
