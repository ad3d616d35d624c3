"""TaylorSeer: the spec's full-step lists, the factor quirks, and the math against diffusers' state."""

import math

import pytest
import torch

from stepcache.errors import ConfigError
from stepcache.policies.taylorseer import (TaylorSeer, TaylorSeries, check_order, forecast, full_steps,
                                           reachable_order, update_factors)


def _dit_full(num_steps, interval):
    """Full steps of the DiT reference (W = 2) as the count-down index i."""
    return [num_steps - 1 - s for s in full_steps(num_steps, TaylorSeer(interval=interval, warmup=2, order=1))]


@pytest.mark.parametrize("interval,count,head,tail", [
    (3, 18, [49, 48, 45, 42], [3, 0]),
    (4, 14, [49, 48, 44, 40], [4, 0]),
    (5, 11, [49, 48, 43], [8, 3]),
    (6, 10, [49, 48, 42], [6, 0]),
])
def test_dit_ddim50_full_steps_match_spec(interval, count, head, tail):
    full = _dit_full(50, interval)
    assert len(full) == count
    assert full[:len(head)] == head and full[-len(tail):] == tail
    assert full[2:] == list(range(49 - 1 - interval, -1, -interval))  # W-1+kN, no forced last step


def test_dit_ddpm250_interval4_full_steps():
    full = _dit_full(250, 4)
    assert len(full) == 64
    assert full[:4] == [249, 248, 244, 240] and full[-2:] == [4, 0]


@pytest.mark.parametrize("steps,expected", [
    (50, [0, 1, 2, 8, 14, 20, 26, 32, 38, 44]),
    (28, [0, 1, 2, 8, 14, 20, 26]),
])
def test_flux_full_steps_match_spec(steps, expected):
    assert full_steps(steps, TaylorSeer(interval=6, order=1, warmup=3)) == expected


def test_video_full_steps_match_spec():
    assert full_steps(50, TaylorSeer(interval=5, order=1, warmup=1)) == list(range(0, 50, 5))


@pytest.mark.parametrize("steps,expected", [
    (50, [0, 1, 2] + list(range(4, 50, 5))),
    (28, [0, 1, 2, 4, 9, 14, 19, 24]),
])
def test_attention_sites_use_diffusers_phase(steps, expected):
    full = full_steps(steps, TaylorSeer(interval=5, order=1, warmup=3, sites="attention"))
    assert full == expected
    if steps == 50:
        assert len(full) == 13


def test_interval_one_is_every_step():
    for sites in ("branches", "attention"):
        assert full_steps(20, TaylorSeer(interval=1, order=1, warmup=1, sites=sites)) == list(range(20))


def test_order_grows_one_per_full_step_from_warmup_minus_one():
    cfg = TaylorSeer(interval=4, order=4, warmup=2)
    series = TaylorSeries(cfg.order, differences_from=cfg.warmup - 1)
    orders = {}
    for s in full_steps(50, cfg):
        series.update(torch.full((2,), float(s * s)), s)
        orders[49 - s] = series.order
    assert [orders[i] for i in (49, 48, 44, 40, 36, 32)] == [0, 1, 2, 3, 4, 4]


def test_flux_warmup_keeps_order_zero_until_step_w_minus_one():
    series = TaylorSeries(1, differences_from=3 - 1)
    seen = []
    for s in (0, 1, 2, 8):
        series.update(torch.tensor([float(s) ** 2]), s)
        seen.append(series.order)
    assert seen == [0, 0, 1, 1]
    assert series.factors[1].item() == (64.0 - 4.0) / 6


def test_second_order_divides_by_latest_spacing_only():
    torch.manual_seed(0)
    feats = {s: torch.randn(3, 5) for s in (0, 1, 5)}
    series = TaylorSeries(2, differences_from=1)
    for s in (0, 1, 5):
        series.update(feats[s], s)
    # DiT i = 44 (s = 5): F2 = ((F44 - F48)/(-4) - (F48 - F49)/(-1)) / (-4), in count-up form
    f1_old = (feats[1] - feats[0]) / 1
    f1 = (feats[5] - feats[1]) / 4
    assert torch.equal(series.factors[1], f1)
    assert torch.equal(series.factors[2], (f1 - f1_old) / 4)


def test_count_down_signs_give_identical_bits():
    torch.manual_seed(1)
    feats = [torch.randn(4, 6) for _ in range(3)]
    up = update_factors(update_factors(update_factors([], feats[0], 0, 2, difference=False, dtype=None),
                                       feats[1], 1, 2, difference=True, dtype=None), feats[2], 4, 2,
                        difference=True, dtype=None)
    down = update_factors(update_factors(update_factors([], feats[0], 0, 2, difference=False, dtype=None),
                                         feats[1], -1, 2, difference=True, dtype=None), feats[2], -4, 2,
                          difference=True, dtype=None)
    assert torch.equal(forecast(up, 3, torch.float32), forecast(down, -3, torch.float32))


def test_linear_features_are_forecast_exactly():
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.25, 0.5, -1.0])
    series = TaylorSeries(3, differences_from=1)
    for s in (0, 1, 5, 9):
        series.update(a + b * s, s)
    for s in (10, 11, 12):
        assert torch.allclose(series.predict(s), a + b * s, atol=1e-6, rtol=0)


def test_forecast_is_left_to_right_reference_arithmetic():
    torch.manual_seed(2)
    fac = [torch.randn(7) for _ in range(4)]
    x = 3
    want = fac[0] * 1
    for k in range(1, 4):
        want = want + (1 / math.factorial(k)) * fac[k] * x ** k
    assert torch.equal(forecast(fac, x, torch.float32), want)


def test_factors_float32_output_in_model_dtype():
    series = TaylorSeries(1, dtype=torch.float32, differences_from=0)
    series.update(torch.ones(4, dtype=torch.bfloat16), 0)
    series.update(torch.full((4,), 2.0, dtype=torch.bfloat16), 1)
    assert all(f.dtype == torch.float32 for f in series.factors)
    out = series.predict(2, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.full((4,), 3.0, dtype=torch.bfloat16))


@pytest.mark.parametrize("order,dtype", [(1, torch.float32), (2, torch.float32), (3, torch.float32),
                                         (2, torch.bfloat16)])
def test_diffusers_rules_equal_diffusers_state_bitwise(order, dtype):
    from diffusers.hooks.taylorseer_cache import TaylorSeerState

    theirs = TaylorSeerState(taylor_factors_dtype=torch.float32, max_order=order)
    ours = TaylorSeries(order, dtype=torch.float32, rules="diffusers")
    cfg = TaylorSeer(interval=3, order=order, warmup=2, sites="attention")
    gen = torch.Generator().manual_seed(3)
    for s in range(16):
        theirs.current_step += 1
        feat = torch.randn(2, 5, 8, generator=gen).to(dtype) * (1 + s)
        if full_steps(16, cfg).count(s):
            theirs.update((feat,))
            ours.update(feat, s)
        else:
            assert torch.equal(ours.predict(s, dtype), theirs.predict()[0])


def test_bad_settings_name_the_fix():
    for kw, word in [({"interval": 0}, "interval"), ({"order": -1}, "order"), ({"warmup": 0}, "warmup"),
                     ({"sites": "blocks"}, "sites"), ({"factors_dtype": "int8"}, "factors_dtype"),
                     ({"interval": True}, "interval")]:
        with pytest.raises(ConfigError, match=word):
            TaylorSeer(**kw)


def test_order_above_history_is_refused():
    cfg = TaylorSeer(interval=4, order=4, warmup=2)
    assert reachable_order(10, cfg) == 3  # full steps 0, 1, 5, 9
    with pytest.raises(ConfigError, match="order <= 3"):
        check_order(10, cfg)
    check_order(50, cfg)


def test_forecast_without_factors_fails_clearly():
    with pytest.raises(ConfigError, match="first full step"):
        TaylorSeries(1).predict(3)


def test_config_round_trips_through_dict():
    cfg = TaylorSeer(interval=5, order=1, warmup=3, sites="attention", factors_dtype="bfloat16")
    d = cfg.to_dict()
    assert d["method"] == "taylorseer"
    assert TaylorSeer(**{k: v for k, v in d.items() if k != "method"}) == cfg


def test_a_second_solver_stage_of_a_full_step_keeps_the_first_value():
    series = TaylorSeries(1, differences_from=0)
    series.update(torch.zeros(3), 0)
    series.update(torch.ones(3), 1)
    series.update(torch.full((3,), 9.0), 1)  # stage 1 of step 1: no division by a zero distance
    assert torch.equal(series.factors[0], torch.ones(3)) and torch.equal(series.factors[1], torch.ones(3))
