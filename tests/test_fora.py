"""FORA: schedule counts from the spec, exactness against an independent loop, invariants."""

import pytest
import torch

import stepcache
from stepcache import FORA, NoCache, sample
from stepcache.diffusion.schedule import Diffusion
from stepcache.core.policy import make_handler
from stepcache.core.context import ModelInfo, SiteKey
from stepcache.policies.fora import fora_refresh
from stepcache.core.context import RunInfo, StepContext
from stepcache.sampling.guidance import guided_forward
from stepcache.sampling.samplers import ddpm_step
from helpers import hand_fora_pass, tiny_dit


def _run(model, steps, policy, sampler="ddpm", n=2, seed=0, cfg=1.5):
    torch.manual_seed(seed)
    z = torch.randn(n, 4, model.input_size, model.input_size)
    y = torch.arange(n) % model.num_classes
    torch.manual_seed(seed + 1)
    return sample(model, z, y, num_steps=steps, sampler=sampler, cfg_scale=cfg, policy=policy, return_stats=True)


@pytest.mark.parametrize("steps,interval,count", [(250, 3, 84), (250, 4, 64), (50, 3, 18), (250, 2, 126),
                                                  (250, 5, 51), (250, 6, 43), (250, 7, 37), (250, 8, 33), (20, 3, 8)])
def test_refresh_counts_match_spec(steps, interval, count):
    handler = make_handler(FORA(interval), ModelInfo(depth=1, num_tokens=4, grid=(2, 2), branches=("attn", "mlp")))
    handler.reset(RunInfo(steps, 1))
    full = [i for i in range(steps - 1, -1, -1) if handler.decide(StepContext(i, steps), SiteKey(0, "mlp"), None).kind
            == "compute"]
    assert len(full) == count
    assert full[0] == steps - 1 and full[-1] == 0


@pytest.mark.parametrize("steps,interval,count", [(250, 4, 64), (50, 3, 18)])
def test_refresh_counts_through_a_real_run(steps, interval, count):
    model = tiny_dit(depth=1, hidden=32, heads=2, input_size=4)
    _, stats = _run(model, steps, FORA(interval), n=1)
    full = stats.full_steps()
    assert len(full) == count
    assert full == [i for i in range(steps - 1, -1, -1) if fora_refresh(i, steps, interval)]
    assert stats.nfe == steps
    assert all(k == 0 for i in stats.steps() if i not in full for k in stats.decisions[i].values())


def test_refresh_sequences_from_spec():
    assert [i for i in range(249, -1, -1) if fora_refresh(i, 250, 3)][:3] == [249, 246, 243]
    assert [i for i in range(249, -1, -1) if fora_refresh(i, 250, 4)][:3] == [249, 248, 244]
    assert [i for i in range(49, -1, -1) if fora_refresh(i, 50, 3)][:3] == [49, 48, 45]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_interval_one_equals_no_cache_bitwise(sampler):
    model = tiny_dit()
    base, _ = _run(model, 12, None, sampler)
    one, stats = _run(model, 12, FORA(1), sampler)
    assert torch.equal(base, one)
    assert stats.ideal_speedup == 1.0


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_active_fora_changes_output_and_saves_work(sampler):
    model = tiny_dit()
    base, _ = _run(model, 12, None, sampler)
    cached, stats = _run(model, 12, FORA(3), sampler)
    assert not torch.allclose(base, cached)
    assert torch.isfinite(cached).all()
    assert stats.macs_executed < 0.6 * stats.macs_uncached


def _independent_fora(model, z, y, steps, interval, cfg):
    """FORA written out by hand from the spec: a loop over blocks with one cache per layer."""
    diffusion = Diffusion(steps)
    n = z.shape[0]
    x = torch.cat([z, z])
    yy = torch.cat([y, torch.full_like(y, model.num_classes)])
    cache = {}

    def forward(xin, t, labels):
        return hand_fora_pass(model, xin, t, labels, cache, refresh)

    with torch.no_grad():
        for i in range(steps - 1, -1, -1):
            refresh = i == steps - 1 or i % interval == 0
            it = torch.full((2 * n,), i, dtype=torch.long)
            out = guided_forward(forward, x, diffusion.model_timesteps(it), yy, cfg)
            x = ddpm_step(diffusion, out, x, it)
    return x[:n]


def test_matches_independent_implementation_bitwise():
    model = tiny_dit(depth=3)
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8, 8)
    y = torch.tensor([3, 7])
    torch.manual_seed(1)
    ours = sample(model, z, y, num_steps=20, sampler="ddpm", cfg_scale=1.5, policy=FORA(3))
    torch.manual_seed(1)
    ref = _independent_fora(model, z, y, 20, 3, 1.5)
    assert torch.equal(ours, ref)


def test_cond_and_uncond_rows_keep_their_own_features():
    model = tiny_dit()
    torch.manual_seed(0)
    z = torch.randn(1, 4, 8, 8)
    with stepcache.apply(model, FORA(3)) as handle:
        torch.manual_seed(1)
        handle.begin_run(4, 2, cfg=True)
        # Drive two steps by hand and look inside the store.
        from stepcache.core.context import StepContext

        handle.set_step(StepContext(3, 4))
        x2 = torch.cat([z, z])
        yy = torch.tensor([4, model.num_classes])
        with torch.no_grad():
            model(x2, torch.tensor([999, 999]), yy)
        a = handle.state.call(0).store[SiteKey(0, "attn")]
        assert a.shape[0] == 2 and not torch.allclose(a[0], a[1])  # same input, different labels
    assert not handle.state.calls  # freed on remove


def test_rows_are_independent_of_batch_company():
    model = tiny_dit()
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8, 8)
    y = torch.tensor([1, 2])
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    both = sample(model, z, y, 10, "ddim", 1.5, FORA(2), generator=gen())
    alone = sample(model, z[:1], y[:1], 10, "ddim", 1.5, FORA(2), generator=gen())
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-5)


def test_invalid_interval():
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(stepcache.ConfigError):
            FORA(bad)


def test_nocache_policy_equals_plain_model():
    model = tiny_dit()
    plain, _ = _run(model, 8, None)
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8, 8)
    torch.manual_seed(1)
    with torch.no_grad():
        out = sample(model, z, torch.arange(2), num_steps=8, cfg_scale=1.5)
    assert torch.equal(plain, out)
    none, stats = _run(model, 8, NoCache())
    assert torch.equal(plain, none) and stats.mac_ratio == 1.0


def test_policy_config_round_trips():
    cfg = FORA(interval=4)
    assert stepcache.PolicyConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(stepcache.ConfigError):
        stepcache.PolicyConfig.from_dict({"method": "nope"})
