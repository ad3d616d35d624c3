"""Parity with the peers' own code on tiny offline pipelines (random weights, no downloads): stepcache's
policies take the same steps as diffusers' hooks (and cache-dit) and give the same latents."""

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


@pytest.fixture(scope="module", autouse=True)
def one_thread_module():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
