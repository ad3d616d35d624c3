"""Parity with the peers' own code on tiny offline pipelines (random weights, no downloads): stepcache's
policies take the same steps as diffusers' hooks (and cache-dit) and give the same latents."""

import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import stepcache  # noqa: E402
from stepcache import FBCache, MagCache, TaylorSeer  # noqa: E402
from peers import cache_context, enable_peer_cache, loud, skipped, step_recorder  # noqa: E402
from test_diffusers import (build_dit, build_flux, build_pixart, build_sd3, run_dit, run_flux, run_pixart,  # noqa: E402
                            run_sd3)

STEPS = 12
FAMILIES = {"flux": (loud(build_flux), run_flux, False), "sd3": (loud(build_sd3), run_sd3, True),
            "pixart": (loud(build_pixart), run_pixart, True), "dit": (loud(build_dit, 1.0), run_dit, True)}
# FirstBlockCache thresholds that give a mix of skipped and computed steps on each tiny model
FB_THRESHOLDS = {"flux": 0.05, "pixart": 0.1, "dit": 0.05}
MAG_RATIOS = [1.0] + [0.97 + 0.01 * (s % 5) for s in range(STEPS - 1)]


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _peer_run(build, run, config, needs_context, module=lambda tr: None):
    """Latents and computed steps of a fresh pipeline under diffusers' hook for ``config``."""
    pipe = build()
    tr = pipe.transformer
    enable_peer_cache(tr, config)
    with step_recorder(tr, module=module(tr)) as rec:
        if needs_context:  # this pipeline sets no cache context; diffusers' stateful hooks need one
            with cache_context(tr):
                out = run(pipe, steps=STEPS)
        else:
            out = run(pipe, steps=STEPS)
    return out, skipped(rec, STEPS)


def _our_run(build, run, policy):
    pipe = build()
    with stepcache.apply(pipe, policy) as handle:
        out = run(pipe, steps=STEPS)
        stats = handle.stats()
    return out, stats


def _steps_of_kind(stats, site, kind):
    return sorted(STEPS - 1 - i for i in stats.steps() if stats.kinds[i].get(site) == kind)


@pytest.mark.parametrize("family", ["flux", "sd3"])  # diffusers' default patterns hook nothing on DiT, PixArt
@pytest.mark.parametrize("interval,warmup,order", [(3, 2, 1), (2, 3, 2), (4, 1, 1)])
def test_taylorseer_attention_equals_diffusers_hook(family, interval, warmup, order):
    from diffusers import TaylorSeerCacheConfig

    build, run, ctx = FAMILIES[family]
    base = run(build(), steps=STEPS)
    theirs, their_skips = _peer_run(build, run, TaylorSeerCacheConfig(
        cache_interval=interval, disable_cache_before_step=warmup, max_order=order,
        taylor_factors_dtype=torch.float32), ctx, module=lambda tr: tr.transformer_blocks[0].attn.to_q)
    ours, stats = _our_run(build, run, TaylorSeer(interval=interval, order=order, warmup=warmup, sites="attention"))
    assert their_skips and _steps_of_kind(stats, "0.attn", "forecast") == their_skips
    assert _steps_of_kind(stats, "0.mlp", "forecast") == []  # MLPs run every step, as under the hook
    assert (theirs - base).abs().max() > 1e-5  # the forecast changes the result...
    assert torch.equal(ours, theirs)  # ...and both implementations change it identically


def _last_block_skips(stats, layer):
    return sorted(STEPS - 1 - i for i in stats.steps() if stats.kinds[i].get(f"{layer}.attn") == "reuse")


@pytest.mark.parametrize("family", list(FB_THRESHOLDS))
def test_fbcache_equals_diffusers_first_block_cache(family):
    from diffusers import FirstBlockCacheConfig

    build, run, _ = FAMILIES[family]
    thr = FB_THRESHOLDS[family]
    base = run(build(), steps=STEPS)
    theirs, their_skips = _peer_run(build, run, FirstBlockCacheConfig(threshold=thr), True)
    ours, stats = _our_run(build, run, FBCache(thr))
    depth = stats_depth(stats)
    assert their_skips and len(their_skips) < STEPS - 1
    assert _last_block_skips(stats, depth - 1) == their_skips and _last_block_skips(stats, 0) == []
    assert (theirs - base).abs().max() > 1e-5
    assert torch.equal(ours, theirs)  # same arithmetic in the same order: bit for bit


@pytest.mark.parametrize("family", ["flux", "pixart", "dit"])
@pytest.mark.parametrize("threshold", [0.06, 0.2])
def test_magcache_equals_diffusers_mag_cache(family, threshold):
    from diffusers import MagCacheConfig

    build, run, _ = FAMILIES[family]
    base = run(build(), steps=STEPS)
    theirs, their_skips = _peer_run(build, run, MagCacheConfig(threshold=threshold, num_inference_steps=STEPS,
                                                               mag_ratios=MAG_RATIOS), False)
    ours, stats = _our_run(build, run, MagCache(threshold=threshold, mag_ratios=MAG_RATIOS))
    assert their_skips
    assert _last_block_skips(stats, 0) == _last_block_skips(stats, stats_depth(stats) - 1) == their_skips
    assert (theirs - base).abs().max() > 1e-6
    assert torch.equal(ours, theirs)  # same arithmetic in the same order: bit for bit


def stats_depth(stats):
    return 1 + max(int(site.split(".")[0]) for per in stats.decisions.values() for site in per)


@pytest.mark.parametrize("family,front,back,threshold,warmup,max_streak", [
    ("flux", 1, 0, 0.1, 2, -1), ("flux", 1, 1, 0.2, 3, 2), ("pixart", 1, 0, 0.05, 1, 2), ("dit", 1, 0, 0.05, 1, 2)])
def test_dbcache_takes_cache_dits_decisions(family, front, back, threshold, warmup, max_streak):
    cache_dit = pytest.importorskip("cache_dit")
    build, run, _ = FAMILIES[family]
    pipe = build()
    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
        Fn_compute_blocks=front, Bn_compute_blocks=back, residual_diff_threshold=threshold, max_warmup_steps=warmup,
        max_continuous_cached_steps=max_streak))
    try:
        theirs = run(pipe, steps=STEPS)
        their_cached = cache_dit.summary(pipe)[0].cached_steps
    finally:
        cache_dit.disable_cache(pipe)  # cache-dit patches the pipeline CLASS; undo it for the other tests
    ours, stats = _our_run(build, run, stepcache.DBCache(front=front, back=back, threshold=threshold, warmup=warmup,
                                                         max_continuous_cached_steps=max_streak))
    assert their_cached and len(their_cached) < STEPS - warmup
    assert _last_block_skips(stats, front) == their_cached
    assert _last_block_skips(stats, 0) == []
    assert torch.equal(ours, theirs)


def _reference_modulated_input(block, args, kwargs):
    """TeaCache's indicator written as its reference code does for each block type (block 0's norm1)."""
    kwargs = inspect.signature(type(block).forward).bind(block, *args, **kwargs).arguments
    h = kwargs["hidden_states"]
    name = type(block).__name__
    if name in ("FluxTransformerBlock", "JointTransformerBlock"):
        return block.norm1(h.clone(), emb=kwargs["temb"].clone())[0]
    if block.norm_type == "ada_norm_zero":  # diffusers DiT
        return block.norm1(h, kwargs["timestep"], kwargs["class_labels"], hidden_dtype=h.dtype)[0]
    t = kwargs["timestep"]  # PixArt: ada_norm_single
    shift, scale = (block.scale_shift_table[None] + t.reshape(h.shape[0], 6, -1)).chunk(6, dim=1)[:2]
    return (torch.nn.functional.layer_norm(h, block.norm1.normalized_shape, eps=block.norm1.eps) * (1 + scale)
            + shift).squeeze(1)


@pytest.mark.parametrize("family,threshold", [("flux", 0.3), ("sd3", 0.3), ("pixart", 0.3), ("dit", 0.3)])
def test_teacache_on_diffusers_families_follows_the_modulated_input(family, threshold):
    from stepcache import TeaCache
    from stepcache.policies.teacache import TeaState

    build, run, _ = FAMILIES[family]
    identity = (0.0, 0.0, 0.0, 1.0, 0.0)  # poly(rel) = rel: the decisions follow the raw indicator
    base = run(build(), steps=STEPS)
    pipe = build()
    inputs = []
    block0 = pipe.transformer.transformer_blocks[0]
    hook = block0.register_forward_pre_hook(
        lambda mod, args, kwargs: inputs.append(_reference_modulated_input(mod, args, kwargs)), with_kwargs=True)
    with stepcache.apply(pipe, TeaCache(threshold, coefficients=identity)) as handle:
        ours = run(pipe, steps=STEPS)
        stats = handle.stats()
    hook.remove()
    state, want = TeaState(), []
    for s, m in enumerate(inputs):
        if state.step(s, STEPS, m, identity, threshold):
            want.append(s)
    assert len(inputs) == STEPS and want and 0 not in want and STEPS - 1 not in want
    assert _last_block_skips(stats, 0) == want
    assert stats.macs_policy > 0
    assert not torch.equal(ours, base)
    noop = TeaCache(1e-12, coefficients=identity)
    assert torch.equal(_our_run(build, run, noop)[0], base)  # never skipping is exactly uncached


@pytest.mark.parametrize("policy_name", ["fbcache", "magcache", "taylorseer"])
def test_true_cfg_calls_keep_their_own_state_like_diffusers_contexts(policy_name):
    """FLUX with true CFG calls the transformer twice per step ("cond", then "uncond" contexts in
    diffusers); stepcache keeps one state per call of the step: the same latents, bit for bit."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    build, run, _ = FAMILIES["flux"]
    cfg_run = lambda pipe, steps: run(pipe, steps=steps, cfg=2.0)  # noqa: E731
    peer, ours_cfg = {
        "fbcache": (FirstBlockCacheConfig(threshold=0.05), FBCache(0.05)),
        "magcache": (MagCacheConfig(threshold=0.06, num_inference_steps=STEPS, mag_ratios=MAG_RATIOS),
                     MagCache(threshold=0.06, mag_ratios=MAG_RATIOS)),
        "taylorseer": (TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2,
                                             taylor_factors_dtype=torch.float32),
                       TaylorSeer(interval=3, order=1, warmup=2, sites="attention")),
    }[policy_name]
    base = cfg_run(build(), STEPS)
    theirs, _ = _peer_run(build, cfg_run, peer, False)
    ours, stats = _our_run(build, cfg_run, ours_cfg)
    assert stats.nfe == 2 * STEPS
    assert (theirs - base).abs().max() > 1e-5
    assert torch.equal(ours, theirs)


NOOP_AND_ACTIVE = {
    "taylorseer": (TaylorSeer(interval=1, order=1, warmup=1), TaylorSeer(interval=3, order=2, warmup=2)),
    "fbcache": (FBCache(1e-12), FBCache(0.5)),
    "magcache": (MagCache(retention_ratio=1.0, mag_ratios=MAG_RATIOS), MagCache(0.2, mag_ratios=MAG_RATIOS)),
    "teacache": (stepcache.TeaCache(1e-12, coefficients=(0, 0, 0, 1, 0)),
                 stepcache.TeaCache(0.5, coefficients=(0, 0, 0, 1, 0))),
    "dbcache": (stepcache.DBCache(front=1, threshold=1e-12, warmup=0), stepcache.DBCache(front=1, threshold=0.5,
                                                                                       warmup=2)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", list(NOOP_AND_ACTIVE))
def test_every_method_on_every_family_noop_exact_active_saves_work(family, method):
    build, run, _ = FAMILIES[family]
    noop, active = NOOP_AND_ACTIVE[method]
    base = run(build(), steps=STEPS)
    same, noop_stats = _our_run(build, run, noop)
    assert torch.equal(same, base)
    assert noop_stats.macs_executed >= noop_stats.macs_uncached  # nothing saved, the policy's own work counted
    changed, stats = _our_run(build, run, active)
    assert not torch.equal(changed, base)
    assert stats.macs_executed < stats.macs_uncached and stats.peak_cache_bytes > 0


def _build_flux_bf16():
    pipe = FAMILIES["flux"][0]()
    pipe.transformer.to(torch.bfloat16)
    return pipe


def _run_flux_bf16(pipe, steps):
    from test_diffusers import _embeds, _latents

    pe, _ = _embeds((0,), 6, 32, 0)
    pp = torch.randn(1, 32, generator=torch.Generator().manual_seed(7))
    return pipe(prompt=None, prompt_embeds=pe.bfloat16(), pooled_prompt_embeds=pp.bfloat16(), height=64, width=64,
                latents=_latents((0,), (16, 16)).bfloat16(), num_inference_steps=steps, output_type="latent").images


@pytest.mark.parametrize("method", ["taylorseer-f32", "taylorseer-bf16", "fbcache", "magcache"])
def test_bfloat16_flux_equals_diffusers_hooks(method):
    """In bf16 the indicators are bf16-rounded and the Taylor factors kept in ``factors_dtype``, as the peers do."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    peer, ours_cfg = {
        "taylorseer-f32": (TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2, max_order=2,
                                                 taylor_factors_dtype=torch.float32),
                           TaylorSeer(interval=3, order=2, warmup=2, sites="attention")),
        "taylorseer-bf16": (TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2),  # its default
                            TaylorSeer(interval=3, order=1, warmup=2, sites="attention", factors_dtype="bfloat16")),
        "fbcache": (FirstBlockCacheConfig(threshold=0.05), FBCache(0.05)),
        "magcache": (MagCacheConfig(threshold=0.06, num_inference_steps=STEPS, mag_ratios=MAG_RATIOS),
                     MagCache(0.06, mag_ratios=MAG_RATIOS)),
    }[method]
    base = _run_flux_bf16(_build_flux_bf16(), STEPS)
    theirs, _ = _peer_run(_build_flux_bf16, _run_flux_bf16, peer, False)
    ours, stats = _our_run(_build_flux_bf16, _run_flux_bf16, ours_cfg)
    assert ours.dtype == torch.bfloat16 and not torch.equal(theirs, base)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family,threshold,warmup", [("flux", 0.1, 2), ("flux", 0.1, 4), ("dit", 0.05, 2),
                                                     ("pixart", 0.05, 3)])
def test_dbcache_taylorseer_equals_cache_dit_calibrator(family, threshold, warmup):
    """cache-dit's TaylorSeer calibrator takes its first difference at step 3: TaylorSeer(order=1, warmup=4)."""
    cache_dit = pytest.importorskip("cache_dit")
    from cache_dit.caching.cache_contexts.calibrators import TaylorSeerCalibratorConfig

    build, run, _ = FAMILIES[family]
    pipe = build()
    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold, max_warmup_steps=warmup),
        calibrator_config=TaylorSeerCalibratorConfig(taylorseer_order=1))
    try:
        theirs = run(pipe, steps=STEPS)
        their_cached = cache_dit.summary(pipe)[0].cached_steps
    finally:
        cache_dit.disable_cache(pipe)
    policy = stepcache.DBCache(front=1, threshold=threshold, warmup=warmup, forecast=TaylorSeer(order=1, warmup=4))
    ours, stats = _our_run(build, run, policy)
    forecast = sorted(STEPS - 1 - i for i in stats.steps() if stats.kinds[i].get("1.attn") == "forecast")
    assert their_cached and forecast == their_cached
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family,norm", [("dit", "norm3"), ("pixart", "norm2"), ("sd3", "norm2")])
def test_norms_feeding_a_forecast_branch_are_skipped_without_changing_the_output(family, norm, monkeypatch):
    from stepcache.adapters.diffusers.common import DiffusersAdapter

    build, run, _ = FAMILIES[family]
    policy = TaylorSeer(interval=3, order=2, warmup=2)
    widths = []

    def traced_run():
        pipe = build()
        hook = getattr(pipe.transformer.transformer_blocks[0], norm).register_forward_hook(
            lambda _m, _i, out: widths.append(out.shape[1]))
        with stepcache.apply(pipe, policy):
            out = run(pipe, steps=STEPS)
        hook.remove()
        return out

    fast = traced_run()
    skipped, widths[:] = list(widths), []
    monkeypatch.setattr(DiffusersAdapter, "skip_unused_norms", False)
    slow = traced_run()
    assert torch.equal(fast, slow)
    assert 1 in skipped and 1 not in widths  # forecast steps normalised one token instead of all
