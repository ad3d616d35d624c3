"""Dynamic caching decisions without a model: MagCache, TeaCache, FBCache and DBCache replay the spec."""

import numpy as np
import pytest
import torch

import stepcache

from stepcache.errors import ConfigError
from stepcache.policies.calibration_data import published, published_by_name
from stepcache.policies.dbcache import DBCache, DualBlockState
from stepcache.policies.fbcache import FBCache, FirstBlockState
from stepcache.policies.magcache import (TABLE as MAG_TABLE, MagCache, interpolate_ratios, resolve_ratios,
                                         retention_steps, skipped_steps)
from stepcache.policies.taylorseer import TaylorSeer
from stepcache.policies.teacache import TABLE as TEA_TABLE, TeaCache, TeaState, poly, replay, resolve_coefficients

FLUX = "diffusers.FluxTransformer2DModel"
FLUX_RATIOS = published(MAG_TABLE, "mag_ratios", FLUX)


# --- MagCache -----------------------------------------------------------------------------------

def test_flux_ratios_are_the_published_table():
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS
    assert torch.equal(torch.tensor(FLUX_RATIOS, dtype=torch.float32), FLUX_MAG_RATIOS.float())
    assert len(FLUX_RATIOS) == 28 and abs(sum(FLUX_RATIOS) - 28.3828) < 1e-4


@pytest.mark.parametrize("steps,thr,expected", [
    (28, 0.06, [6, 8, 10, 11, 12, 14, 15, 16, 18, 19, 20, 22, 23, 25]),
    (28, 0.12, 16),
    (28, 0.24, 17),
    (50, 0.06, [10, 12, 14, 16, 18, 20, 21, 22, 24, 25, 26, 28, 29, 30, 32, 33, 34, 36, 37, 38, 40, 41, 43, 45]),
    (20, 0.06, 10),
])
def test_magcache_skipped_steps_match_spec(steps, thr, expected):
    skipped = skipped_steps(MagCache(thr, mag_ratios=FLUX_RATIOS), steps)
    if isinstance(expected, int):
        assert len(skipped) == expected
    else:
        assert skipped == expected


@pytest.mark.parametrize("steps", [1, 20, 28, 50, 100])
def test_interpolation_equals_diffusers(steps):
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS, nearest_interp
    assert torch.equal(interpolate_ratios(FLUX_RATIOS, steps), nearest_interp(FLUX_MAG_RATIOS, steps).float())


def test_interpolation_index_pattern_28_to_50():
    idx = interpolate_ratios(list(range(28)), 50).long().tolist()
    assert idx[:11] == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6] and idx[-3:] == [26, 26, 27]


def test_retention_steps():
    assert [retention_steps(0.2, s) for s in (28, 50, 20)] == [6, 10, 4]


def test_magcache_never_skips_more_than_k_in_a_row():
    skipped = set(skipped_steps(MagCache(10.0, max_skip_steps=2, mag_ratios=FLUX_RATIOS), 28))
    assert all(not {s, s + 1, s + 2} <= skipped for s in range(28))


def test_magcache_without_ratios_names_calibrate():
    with pytest.raises(ConfigError, match="stepcache calibrate"):
        resolve_ratios(MagCache(), "diffusers.PixArtTransformer2DModel")
    assert resolve_ratios(MagCache(), FLUX) == FLUX_RATIOS


def test_magcache_reads_a_calibration_file(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text('{"mag_ratios": [1.0, 1.1, 0.9]}')
    assert MagCache(mag_ratios=str(path)).mag_ratios == (1.0, 1.1, 0.9)
    with pytest.raises(ConfigError, match="stepcache calibrate"):
        MagCache(mag_ratios=str(tmp_path / "missing.json"))


@pytest.mark.parametrize("kw", [{"threshold": 0}, {"threshold": -1}, {"max_skip_steps": 0},
                                {"retention_ratio": 1.5}, {"mag_ratios": []}, {"mag_ratios": [1.0, -1.0]}])
def test_magcache_bad_settings(kw):
    with pytest.raises(ConfigError):
        MagCache(**kw)


# --- TeaCache -----------------------------------------------------------------------------------

def test_teacache_polynomial_test_vectors():
    flux = published_by_name(TEA_TABLE, "coefficients", "flux")
    for x, want in [(0, 0.264231), (0.05, 0.180503), (0.1, 0.206847), (0.2, 0.261995)]:
        assert round(poly(flux, x), 6) == want
        assert poly(flux, x) == np.poly1d(flux)(x)  # Horner, float64, numpy's arithmetic
    assert round(poly(published_by_name(TEA_TABLE, "coefficients", "hunyuan-video"), 0.1), 6) == 0.129196
    assert round(poly(published_by_name(TEA_TABLE, "coefficients", "open-sora-1.2"), 0.1), 6) == 0.215937


@pytest.mark.parametrize("thr,run", [(0.25, 1), (0.4, 2), (0.6, 3), (0.8, 4)])
def test_teacache_flux_threshold_caps_skips_in_a_row(thr, run):
    flux = TeaCache(coefficients="flux").coefficients
    skipped = replay([0.053] * 50, flux, thr)
    longest, cur = 0, 0
    for s in range(50):
        cur = cur + 1 if s in skipped else 0
        longest = max(longest, cur)
    assert longest == run
    assert 0 not in skipped and 49 not in skipped


def test_teastate_forces_first_and_last_and_tracks_every_step():
    flux = TeaCache(coefficients="flux").coefficients
    state, out = TeaState(), []
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(2, 8, 4, generator=gen)
    for s in range(10):
        m = m * 1.001
        out.append(state.step(s, 10, m, flux, 0.6))
        assert state.prev is m  # replaced on every step, skipped ones included
    assert out[0] is False and out[-1] is False and any(out)


def test_teacache_coefficients_sources(tmp_path):
    assert resolve_coefficients(TeaCache(), FLUX)[0] == 498.651651
    with pytest.raises(ConfigError, match="stepcache calibrate"):
        resolve_coefficients(TeaCache(), "diffusers.DiTTransformer2DModel")
    path = tmp_path / "c.json"
    path.write_text('{"teacache_coefficients": [1, 2, 3, 4, 5]}')
    assert TeaCache(coefficients=str(path)).coefficients == (1.0, 2.0, 3.0, 4.0, 5.0)
    with pytest.raises(ConfigError, match="stepcache calibrate"):
        TeaCache(coefficients="no-such-model")
    with pytest.raises(ConfigError, match="threshold"):
        TeaCache(threshold=0)


# --- FBCache ------------------------------------------------------------------------------------

def test_fbcache_ties_skip_and_only_computed_steps_refresh():
    state = FirstBlockState()
    ref = torch.ones(4)
    assert state.should_compute(ref, 0.25)  # nothing stored: compute
    assert not state.should_compute(torch.full((4,), 1.25), 0.25)  # d == threshold: skip
    assert state.ref is ref  # not refreshed by a skip
    assert state.should_compute(torch.full((4,), 1.5), 0.25)  # d = 0.5 > 0.25
    assert torch.equal(state.ref, torch.full((4,), 1.5))


def test_fbcache_bad_threshold():
    with pytest.raises(ConfigError, match="threshold"):
        FBCache(0.0)


# --- DBCache ------------------------------------------------------------------------------------

def _toy_run(config, steps=28):
    """One call per step, a slowly drifting front residual (d grows 1e-4 per step since the refresh)."""
    state, cached = DualBlockState(config), []
    for s in range(steps):
        r = torch.full((2, 4, 8), 1.0 + 1e-4 * s)
        if state.decide(s, r):
            cached.append(s)
    return cached, state


def test_dbcache_defaults_warm_up_eight_steps():
    cached, state = _toy_run(DBCache())
    assert cached == list(range(8, 28))
    assert state.diffs[8] == pytest.approx(1e-4 / 1.0007, rel=1e-3)
    assert state.diffs[10] > state.diffs[9] > state.diffs[8]  # drift since the last refresh grows


def test_dbcache_warmup_interval_two():
    cached, _ = _toy_run(DBCache(warmup=8, warmup_interval=2))
    assert cached[:4] == [1, 3, 5, 7]
    assert not {0, 2, 4, 6} & set(cached)


def test_dbcache_continuous_limit():
    cached, _ = _toy_run(DBCache(max_continuous_cached_steps=3))
    assert cached == [8, 9, 10, 12, 13, 14, 16, 17, 18, 20, 21, 22, 24, 25, 26]


def test_dbcache_total_limit():
    cached, _ = _toy_run(DBCache(max_cached_steps=5))
    assert cached == [8, 9, 10, 11, 12]


def test_dbcache_threshold_is_strict():
    state = DualBlockState(DBCache(threshold=0.25, warmup=1))
    assert not state.decide(0, torch.ones(4))
    assert not state.decide(1, torch.full((4,), 1.25))  # d == threshold: compute (FBCache would skip)
    assert state.decide(2, torch.full((4,), 1.3))  # against the refreshed 1.25


def test_dbcache_accumulated_cap_counts_computed_steps():
    state = DualBlockState(DBCache(threshold=0.3, warmup=1, max_accumulated_diff=0.5))
    seq = [1.0, 1.4, 1.5, 1.6, 1.7, 1.8]
    got = [state.decide(s, torch.full((4,), v)) for s, v in enumerate(seq)]
    assert got[:3] == [False, False, True]  # d(1.4 vs 1.0) = 0.4 computed, recorded; d = 0.07 cached
    assert got[4:] == [False, False]  # sum of recorded diffs passed 0.5


def test_dbcache_always_cache_at_threshold_one():
    state = DualBlockState(DBCache(threshold=1.0, warmup=1))
    assert [state.decide(s, torch.full((4,), 1.0 + s)) for s in range(4)] == [False, True, True, True]
    assert state.diffs[1] == -1.0


def test_dbcache_validation():
    for kw in [{"front": 0}, {"back": -1}, {"threshold": 0}, {"warmup_interval": 0}, {"max_cached_steps": -2},
               {"forecast": FBCache()}]:
        with pytest.raises(ConfigError):
            DBCache(**kw)
    with pytest.raises(ConfigError, match="front"):
        DBCache(front=8, back=4).check_depth(12)
    DBCache(front=8, back=3).check_depth(12)


def test_dbcache_forecast_round_trips_and_forecasts_linear_residuals():
    cfg = DBCache(front=1, forecast=TaylorSeer(order=1))
    assert DBCache(**{k: v for k, v in cfg.to_dict().items() if k != "method"}) == cfg
    state = DualBlockState(cfg)
    for s in (0, 2):
        state.series.update(torch.full((3,), 2.0 * s), s)
    assert torch.equal(state.series.predict(3), torch.full((3,), 6.0))
    assert cfg.tag() == "DBCache_F1B0_W8I1M0MC0_R0.08"


# --- calibration arithmetic ---------------------------------------------------------------------

def test_fit_recovers_a_known_polynomial_and_files_load(tmp_path):
    from stepcache.policies.calibrate_math import fit_teacache, write_calibration
    flux = np.array(TeaCache(coefficients="flux").coefficients)
    x = np.linspace(0.01, 0.4, 40)
    coeffs, r2 = fit_teacache(x, np.polyval(flux, x))
    assert np.allclose(coeffs, flux, rtol=1e-6) and r2 > 0.999999
    path = tmp_path / "cal" / "m.json"
    write_calibration(path, model="m", family="f", num_steps=3, mag_ratios=[1.0, 1.1, 0.9],
                      teacache_coefficients=coeffs)
    assert MagCache(mag_ratios=str(path)).mag_ratios == (1.0, 1.1, 0.9)
    assert np.allclose(TeaCache(coefficients=str(path)).coefficients, flux, rtol=1e-6)
    with pytest.raises(ConfigError, match="more than 4"):
        fit_teacache([0.1, 0.2], [0.1, 0.2])


def test_mag_ratios_follow_the_definition():
    from stepcache.policies.calibrate_math import mag_ratios, mean_ratios
    gen = torch.Generator().manual_seed(0)
    res = [torch.randn(2, 6, 8, generator=gen) * (1 + s) for s in range(3)]
    got = mag_ratios(res)
    want = (torch.linalg.norm(res[1], dim=-1) / (torch.linalg.norm(res[0], dim=-1) + 1e-8)).mean().item()
    assert got[0] == 1.0 and got[1] == want and len(got) == 3
    assert mean_ratios([[1.0, 2.0], [1.0, 4.0]]) == [1.0, 3.0]


def test_every_new_config_round_trips_through_the_registry():
    import json

    from stepcache.core.policy import PolicyConfig
    configs = [TaylorSeer(interval=5, order=1, warmup=3, sites="attention"), FBCache(0.1),
               MagCache(0.1, mag_ratios="flux"), TeaCache(0.3, coefficients="flux"),
               DBCache(front=2, back=1, threshold=0.1, forecast=TaylorSeer(order=1, factors_dtype="bfloat16"))]
    for cfg in configs:
        again = PolicyConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg and type(again) is type(cfg)


def test_the_shipped_embedded_model_finds_its_published_magcache_and_teacache_tables():
    """The embedded model's own tables are found by its name (not by the DiT family, which other weights share)."""
    from stepcache.models.embedded import load_embedded
    from stepcache.policies.calibration_data import published

    model = load_embedded()
    with stepcache.apply(model, stepcache.MagCache(threshold=0.06)) as handle:
        assert handle.info.names == ("embedded",)
        assert handle.handler.ratios == published("magcache_ratios.json", "mag_ratios", "x", ("embedded",))
    with stepcache.apply(model, stepcache.TeaCache(threshold=0.1)):
        pass
    other = stepcache.DiT(input_size=16, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                          num_classes=10, learn_sigma=False)  # the same family, other weights: no table
    with pytest.raises(ConfigError, match="stepcache calibrate"):
        stepcache.apply(other, stepcache.MagCache(threshold=0.06))
