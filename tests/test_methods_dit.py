"""TaylorSeer, FBCache, MagCache, TeaCache and DBCache on the native DiT: no-op settings are exact, the
decisions replay the pure rules on the model's own signals, forecasts are the Taylor series of the
full-step outputs, remove() is exact, bad settings are refused with the fix."""

import pytest
import torch

import stepcache
from stepcache import DBCache, FBCache, MagCache, NoCache, TaylorSeer, TeaCache, sample
from stepcache.core.context import ModelInfo, RunInfo, StepContext
from stepcache.core.harness import PolicyDriver
from stepcache.errors import ConfigError
from stepcache.models.dit import modulate
from stepcache.policies.dbcache import DualBlockState
from stepcache.policies.fbcache import FirstBlockState
from stepcache.policies.magcache import skipped_steps
from stepcache.policies.taylorseer import TaylorSeries, full_steps
from stepcache.policies.teacache import TeaState
from helpers import tiny_dit

IDENTITY_POLY = (0.0, 0.0, 0.0, 1.0, 0.0)  # poly(rel) = rel


def _run(model, policy, steps=10, n=2, seed=0, cfg=1.5):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 4, model.input_size, model.input_size, generator=g)
    labels = torch.arange(n) % model.num_classes
    return sample(model, noise, labels, num_steps=steps, sampler="ddim", cfg_scale=cfg, policy=policy,
                  return_stats=True)


def _skipped_s(stats, steps, layer=-1, branch="mlp"):
    """Steps (as s = steps taken) at which ``layer``'s branch did not compute."""
    out = []
    for i in stats.steps():
        per = {int(k.split(".")[0]): v for k, v in stats.decisions[i].items() if k.endswith("." + branch)}
        if per[sorted(per)[layer]] == 0:
            out.append(steps - 1 - i)
    return sorted(out)


@pytest.mark.parametrize("policy", [
    TaylorSeer(interval=1, order=2, warmup=1),
    TaylorSeer(interval=1, order=1, warmup=1, sites="attention"),
    FBCache(threshold=1e-12),
    MagCache(retention_ratio=1.0, mag_ratios=[1.0] * 10),
    TeaCache(threshold=1e-12, coefficients=IDENTITY_POLY),
    DBCache(front=1, back=1, threshold=1e-12, warmup=0),
], ids=lambda p: p.method)
def test_noop_settings_equal_uncached_bit_for_bit(policy, one_thread):
    model = tiny_dit()
    base, base_stats = _run(model, NoCache())
    out, stats = _run(model, policy)
    assert torch.equal(out, base)
    assert stats.macs_uncached == base_stats.macs_uncached and stats.macs_executed >= base_stats.macs_executed


@pytest.mark.parametrize("policy", [TaylorSeer(interval=3, order=2), FBCache(0.2), DBCache(front=1, threshold=0.2,
                                                                                            warmup=2)],
                         ids=lambda p: p.method)
def test_remove_restores_the_model_exactly(policy, one_thread):
    model = tiny_dit()
    base, _ = _run(model, NoCache())
    with stepcache.apply(model, policy):
        cached, _ = _run(model, None)
    assert not torch.equal(cached, base)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(_run(model, None)[0], base)


def test_taylorseer_schedule_on_ddim50_matches_spec(one_thread):
    model = tiny_dit(depth=1, hidden=32, heads=2, input_size=4)
    _, stats = _run(model, TaylorSeer(interval=4, order=2, warmup=2), steps=50, n=1)
    assert stats.full_steps() == [49, 48] + list(range(44, -1, -4))
    assert stats.kind_counts() == {"full": 14, "partial": 0, "reuse": 0, "forecast": 36}
    assert stats.macs_policy > 0 and stats.peak_cache_bytes > 0


@pytest.mark.parametrize("sites", ["branches", "attention"])
def test_taylorseer_emits_the_series_of_the_full_step_outputs(sites, one_thread):
    model = tiny_dit(depth=2)
    cfg = TaylorSeer(interval=3, order=2, warmup=2, sites=sites)
    steps = 12
    full = set(full_steps(steps, cfg))
    seen, emitted = {}, {}
    hooks = [getattr(b, name).register_forward_hook(
        lambda mod, args, out, key=(l, name): seen.setdefault(key, []).append(out.detach().clone()))
        for l, b in enumerate(model.blocks) for name in ("attn", "mlp")]
    with stepcache.apply(model, cfg) as handle:
        decide = handle.handler.decide

        def spy(ctx, site, view):
            action = decide(ctx, site, view)
            if action.kind == "emit":
                emitted[(ctx.progress, site.layer, site.name)] = action.tensor
            return action

        handle.handler.decide = spy
        _run(model, None, steps=steps)
    for h in hooks:
        h.remove()
    targets = ("attn", "mlp") if sites == "branches" else ("attn",)
    for (layer, name), outs in seen.items():
        computed = sorted(full) if name in targets else list(range(steps))
        assert len(outs) == len(computed)
        series = TaylorSeries(2, dtype=torch.float32, rules=cfg.rules,
                              differences_from=cfg.warmup - 1 if cfg.rules == "reference" else 0)
        feats = dict(zip(computed, outs))
        for s in range(steps):
            if s in full or name not in targets:
                if name in targets:
                    series.update(feats[s], s)
                continue
            assert torch.equal(emitted[(s, layer, name)], series.predict(s, torch.float32))
    assert {k[2] for k in emitted} == set(targets)


def test_taylorseer_order_above_history_is_refused_at_run_start(one_thread):
    model = tiny_dit(depth=1)
    with pytest.raises(ConfigError, match="use order <= 2"):
        _run(model, TaylorSeer(interval=4, order=4, warmup=2), steps=8)


def test_magcache_skips_exactly_the_replayed_steps(one_thread):
    model = tiny_dit()
    ratios = [1.0] + [0.98 + 0.01 * (s % 4) for s in range(27)]
    cfg = MagCache(threshold=0.06, mag_ratios=ratios)
    out, stats = _run(model, cfg, steps=28)
    skipped = skipped_steps(cfg, 28)
    assert skipped and _skipped_s(stats, 28, layer=0) == skipped == _skipped_s(stats, 28, layer=-1)
    assert stats.kind_counts()["reuse"] == len(skipped)
    # interpolation: the same ratios given for 14 steps replay at 28 the same way diffusers would
    assert skipped_steps(cfg, 20) == _skipped_s(_run(model, cfg, steps=20)[1], 20)


def _block0_signals(model):
    """Forward hooks recording block 0's (input, output, modulated input) per call."""
    rec = []
    b0 = model.blocks[0]

    def hook(mod, args, out):
        x, c = args
        shift, scale = b0.modulation(c)[:2]
        rec.append((x.detach().clone(), out.detach().clone(), modulate(b0.norm1(x), shift, scale).detach()))

    return rec, b0.register_forward_hook(hook)


def test_fbcache_decisions_replay_block0_residuals(one_thread):
    model = tiny_dit(depth=3)
    steps, thr = 16, 0.2
    rec, h = _block0_signals(model)
    _, stats = _run(model, FBCache(thr), steps=steps)
    h.remove()
    state, want = FirstBlockState(), []
    for s, (x, y, _) in enumerate(rec):
        if not state.should_compute(y - x, thr):
            want.append(s)
    assert want and len(want) < steps - 1, "threshold gives no mix of skipped and computed steps"
    assert _skipped_s(stats, steps, layer=-1) == want
    assert _skipped_s(stats, steps, layer=0) == []  # block 0 always runs


def test_teacache_decisions_replay_the_modulated_input(one_thread):
    model = tiny_dit(depth=2)
    steps, thr = 16, 0.3
    b0, embed, inputs = model.blocks[0], model.embed, []

    def recording_embed(x, t, y):  # the stack input and conditioning of every call, skipped steps included
        h, c = embed(x, t, y)
        shift, scale = b0.modulation(c)[:2]
        inputs.append(modulate(b0.norm1(h), shift, scale))
        return h, c

    model.embed = recording_embed
    try:
        _, stats = _run(model, TeaCache(thr, coefficients=IDENTITY_POLY), steps=steps)
    finally:
        del model.embed
    state, want = TeaState(), []
    for s, m in enumerate(inputs):
        if state.step(s, steps, m, IDENTITY_POLY, thr):
            want.append(s)
    assert want and len(want) < steps - 2, "threshold gives no mix of skipped and computed steps"
    assert _skipped_s(stats, steps, layer=0) == _skipped_s(stats, steps, layer=-1) == want
    assert 0 not in want and steps - 1 not in want
    assert stats.macs_policy > 0  # the probe's adaLN work is counted


def test_dbcache_decisions_replay_and_back_blocks_always_run(one_thread):
    model = tiny_dit(depth=4)
    steps = 16
    cfg = DBCache(front=1, back=1, threshold=0.25, warmup=3, max_continuous_cached_steps=2)
    rec, h = _block0_signals(model)
    _, stats = _run(model, cfg, steps=steps)
    h.remove()
    state, want = DualBlockState(cfg), []
    for s, (x, y, _) in enumerate(rec):
        if state.decide(s, y - x):
            want.append(s)
    assert want and all(s >= 3 for s in want)
    assert _skipped_s(stats, steps, layer=1) == _skipped_s(stats, steps, layer=2) == want
    assert _skipped_s(stats, steps, layer=0) == _skipped_s(stats, steps, layer=3) == []


def test_dbcache_forecast_replaces_reuse_with_a_counted_forecast(one_thread):
    model = tiny_dit(depth=4)
    kw = dict(front=1, threshold=0.25, warmup=2)
    reuse, rs = _run(model, DBCache(**kw), steps=16)
    fc, fs = _run(model, DBCache(**kw, forecast=TaylorSeer(order=1)), steps=16)
    assert rs.kind_counts()["reuse"] == 0 and rs.kind_counts()["partial"] > 0
    assert fs.macs_policy > rs.macs_policy
    assert not torch.equal(reuse, fc)


def test_missing_calibration_names_calibrate(one_thread):
    model = tiny_dit(depth=2)
    for policy in (MagCache(), TeaCache()):
        with pytest.raises(ConfigError, match="stepcache calibrate"):
            stepcache.apply(model, policy)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_dbcache_needs_a_middle_block(one_thread):
    with pytest.raises(ConfigError, match="front"):
        stepcache.apply(tiny_dit(depth=4), DBCache(front=3, back=1))


def test_fbcache_state_is_kept_per_model_call():
    info = ModelInfo(depth=3, num_tokens=4, grid=(2, 2), branches=("attn", "mlp"))
    driver = PolicyDriver(FBCache(0.1), info)
    driver.reset(RunInfo(4, 1))
    r0, r1 = torch.ones(1, 4, 8), torch.full((1, 4, 8), -3.0)
    for call, r in ((0, r0), (1, r1)):
        ctx = StepContext(3, 4, call=call)
        driver.observe(ctx, 0, "span", r, end=1)
        assert driver.decide(ctx, 1, "span", end=3).kind == "compute"
        driver.observe(ctx, 1, "span", torch.zeros(1, 4, 8), end=3)
    for call, r in ((0, r0 * 1.01), (1, r1 * 1.01)):  # each call compares with its own previous residual
        ctx = StepContext(2, 4, call=call)
        driver.observe(ctx, 0, "span", r, end=1)
        assert driver.decide(ctx, 1, "span", end=3).kind == "reuse"
    assert driver.call_state(0).ref is not driver.call_state(1).ref
