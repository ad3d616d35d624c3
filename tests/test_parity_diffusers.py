"""Parity with the peers' own code on tiny offline pipelines (random weights, no downloads): stepcache's
policies take the same steps as diffusers' hooks (and cache-dit) and give the same latents."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import stepcache  # noqa: E402
from stepcache import TaylorSeer  # noqa: E402
from peers import cache_context, enable_peer_cache, loud, skipped, step_recorder  # noqa: E402
from test_diffusers import build_flux, build_sd3, run_flux, run_sd3  # noqa: E402

STEPS = 12
FAMILIES = {"flux": (loud(build_flux), run_flux, False), "sd3": (loud(build_sd3), run_sd3, True)}


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


@pytest.mark.parametrize("family", list(FAMILIES))
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
