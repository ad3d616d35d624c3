"""Forecast: stepcache's own forecasting policy (exact polynomial extrapolation on a free schedule)."""

import pytest
import torch

import stepcache
from stepcache import Forecast, NoCache, sample
from stepcache.core.context import ModelInfo, RunInfo, StepContext
from stepcache.core.harness import PolicyDriver
from stepcache.errors import ConfigError, ModelMismatchError
from stepcache.policies.forecast import lagrange_weights, spaced_schedule
from stepcache.training.forecast_schedule import POWERS, learn_schedule
from helpers import tiny_dit

INFO = ModelInfo(depth=1, num_tokens=4, grid=(2, 2), branches=("attn", "mlp"))


@pytest.mark.parametrize("S,K,power", [(50, 15, 1.3), (50, 15, 1.0), (50, 12, 2.0), (20, 8, 1.5), (10, 10, 1.0)])
def test_spaced_schedule_has_k_increasing_steps_from_0_and_1(S, K, power):
    steps = spaced_schedule(S, K, power)
    assert len(steps) == K and steps[:2] == (0, 1) and list(steps) == sorted(set(steps)) and steps[-1] <= S - 1
    if power > 1:  # denser towards the end: the last gap is no wider than the first one after the warm-up
        assert steps[-1] - steps[-2] <= steps[2] - steps[1]


def test_extrapolation_is_exact_for_polynomials_of_the_order():
    S = 20
    policy = Forecast(full_steps=(0, 1, 5, 9, 14), num_steps=S, order=2)
    drv = PolicyDriver(policy, INFO)
    drv.reset(RunInfo(S, 1))
    a, b, c = (torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(k)) for k in range(3))
    f = lambda s: a + b * s + c * s * s  # noqa: E731
    for s in range(S):
        ctx = StepContext(S - 1 - s, S)
        action = drv.decide(ctx, 0, "mlp")
        if action.kind == "compute":
            drv.observe(ctx, 0, "mlp", f(float(s)))
        elif s > 5:  # three points known: the quadratic is reproduced
            assert action.kind == "emit" and torch.allclose(action.tensor, f(float(s)), rtol=1e-4, atol=1e-3)
            assert action.macs == 2 * a.numel()


def test_lagrange_weights_sum_to_one_and_order_one_matches_taylorseer_on_a_uniform_grid():
    assert sum(lagrange_weights([0, 3, 7], 10)) == pytest.approx(1.0)
    assert lagrange_weights([3, 6], 8) == pytest.approx([-2 / 3, 5 / 3])  # f6 + (8-6) (f6-f3)/3


def test_every_step_full_equals_uncached_bit_for_bit(one_thread):
    model = tiny_dit()
    noise, labels = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    base = sample(model, noise, labels, num_steps=8, sampler="ddim", cfg_scale=1.5, policy=NoCache())
    out = sample(model, noise, labels, num_steps=8, sampler="ddim", cfg_scale=1.5,
                 policy=Forecast(full_steps=tuple(range(8)), num_steps=8))
    assert torch.equal(out, base)
    out, stats = sample(model, noise, labels, num_steps=8, sampler="ddim", cfg_scale=1.5,
                        policy=Forecast(num_full=4, power=0.7), return_stats=True)
    assert not torch.equal(out, base) and stats.kind_counts()["forecast"] == 4 and stats.macs_policy > 0
    assert stats.peak_cache_bytes > 0


def test_bad_settings_and_a_schedule_for_another_step_count_are_refused(one_thread):
    for bad in (dict(full_steps=(1, 2), num_steps=5), dict(full_steps=(0, 2, 2), num_steps=5),
                dict(full_steps=(0, 1)), dict(full_steps=(0, 9), num_steps=5), dict(order=-1), dict(num_full=0),
                dict(power=0)):
        with pytest.raises(ConfigError):
            Forecast(**bad)
    model = tiny_dit()
    noise, labels = torch.randn(1, 4, 8, 8), torch.tensor([1])
    with pytest.raises(ModelMismatchError):
        sample(model, noise, labels, num_steps=6, sampler="ddim", cfg_scale=1.0,
               policy=Forecast(full_steps=(0, 1, 3), num_steps=5))
    assert stepcache.get_handle(model) is None


def test_config_round_trips_and_is_on_the_menu():
    policy = Forecast(full_steps=(0, 1, 4, 7), num_steps=9, order=1)
    assert stepcache.PolicyConfig.from_dict(policy.to_dict()) == policy
    assert "forecast" in stepcache.known_methods() and Forecast.search_space()["order"] == [1, 2]


def test_learn_schedule_improves_on_the_spaced_start(one_thread):
    model = tiny_dit(depth=2, hidden=32, heads=2)
    noise, labels = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([1, 2])
    found = learn_schedule(model, noise, labels, num_steps=10, num_full=5, order=1, cfg_scale=1.5, sweeps=1,
                           moves=(-1, 1))
    assert len(found.policy.full_steps) == 5 and found.policy.num_steps == 10
    spaced_best = max(p for steps, p in found.tried if steps in {spaced_schedule(10, 5, q) for q in
                                                                 POWERS})
    assert found.psnr >= spaced_best and found.tried[0][1] == found.psnr


def test_shipped_learned_schedules_load_and_beat_the_spaced_ones_on_their_held_out_seeds():
    import json

    from stepcache.policies.forecast import SCHEDULES_FILE, learned_schedule

    table = json.loads(SCHEDULES_FILE.read_text())["schedules"]
    assert {"embedded-ddim50-cfg4-K12", "embedded-ddim50-cfg4-K15"} <= set(table)
    policy = learned_schedule("embedded-ddim50-cfg4-K15")
    assert policy.full_steps == tuple(table["embedded-ddim50-cfg4-K15"]["full_steps"]) and policy.num_steps == 50
    assert stepcache.PolicyConfig.from_dict(policy.to_dict()) == policy
    assert Forecast(learned="embedded-ddim50-cfg4-K15") == policy
    for entry in table.values():
        assert entry["held_out_psnr"] > 40 and len(entry["full_steps"]) == int(entry["mac_ratio"] * 50 + 0.5)
    with pytest.raises(ConfigError, match="No learned Forecast schedule"):
        Forecast(learned="nosuch")


def test_stack_scope_forecasts_the_whole_stack_residual(one_thread):
    model = tiny_dit()
    noise, labels = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    run = dict(num_steps=10, sampler="ddim", cfg_scale=1.5)
    base = sample(model, noise, labels, policy=NoCache(), **run)
    assert torch.equal(sample(model, noise, labels, policy=Forecast(full_steps=tuple(range(10)), num_steps=10,
                                                                    scope="stack"), **run), base)
    out, stats = sample(model, noise, labels, policy=Forecast(num_full=5, scope="stack"), return_stats=True, **run)
    assert not torch.equal(out, base) and stats.kind_counts()["forecast"] == 5
    i = next(i for i in stats.steps() if stats.step_kind(i) == "forecast")
    assert stats.tokens(i, "3.mlp") == 0 and stats.kinds[i]["0.attn"] == "forecast"
    with pytest.raises(ConfigError):
        Forecast(scope="blocks")
