"""The caching runtime: exact removal, fresh state per run, clock errors."""

import pytest
import torch

import stepcache
from stepcache import FORA, sample
from stepcache.core.context import StepContext
from helpers import tiny_dit


def _inputs(n=2, size=8, seed=0):
    torch.manual_seed(seed)
    return torch.randn(n, 4, size, size), torch.arange(n)


def test_remove_restores_bit_identical_outputs_and_attributes():
    model = tiny_dit()
    z, y = _inputs()
    t = torch.tensor([500, 20])
    with torch.no_grad():
        before = model(z, t, y)
    handle = stepcache.apply(model, FORA(2))
    assert "forward" in model.__dict__ and "forward" in model.blocks[0].__dict__
    torch.manual_seed(1)
    sample(model, z, y, 6, "ddpm", 1.5)  # driven through the installed handle
    assert handle.stats().nfe == 6
    handle.remove()
    assert "forward" not in model.__dict__
    assert all("forward" not in b.__dict__ for b in model.blocks)
    assert not hasattr(model, "_stepcache_handle")
    with torch.no_grad():
        assert torch.equal(model(z, t, y), before)
    handle.remove()  # idempotent


def test_two_identical_runs_are_identical():
    model = tiny_dit()
    z, y = _inputs()
    outs = []
    with stepcache.apply(model, FORA(3)):
        for _ in range(2):
            torch.manual_seed(3)
            outs.append(sample(model, z, y, 10, "ddpm", 1.5))
    assert torch.equal(outs[0], outs[1])


def test_consecutive_runs_with_other_steps_and_batches_start_fresh():
    model = tiny_dit()
    runs = [(10, 2, "ddpm"), (7, 3, "ddim"), (12, 1, "ddpm")]
    fresh = []
    for steps, n, sampler in runs:
        z, y = _inputs(n, seed=n)
        torch.manual_seed(9)
        fresh.append(sample(model, z, y, steps, sampler, 1.5, FORA(3)))
    with stepcache.apply(model, FORA(3)) as handle:
        for (steps, n, sampler), expected in zip(runs, fresh):
            z, y = _inputs(n, seed=n)
            torch.manual_seed(9)
            assert torch.equal(sample(model, z, y, steps, sampler, 1.5), expected)
            assert handle.stats().nfe == steps
            assert handle.state.nbytes() == 0  # tensors freed at the end of each run


def test_call_outside_a_run_raises_clock_error():
    model = tiny_dit()
    z, y = _inputs()
    with stepcache.apply(model, FORA(2)) as handle:
        with pytest.raises(stepcache.ClockError):
            model(z, torch.tensor([1, 1]), y)
        handle.begin_run(5, 2)
        with pytest.raises(stepcache.ClockError):
            handle.set_step(StepContext(7, 5))
        handle.set_step(StepContext(4, 5))
        with pytest.raises(stepcache.ClockError):  # wrong batch for this run
            model(torch.cat([z, z]), torch.tensor([1] * 4), torch.cat([y, y]))


def test_reuse_before_compute_is_an_error():
    model = tiny_dit()
    z, y = _inputs()
    with stepcache.apply(model, FORA(3)) as handle:
        handle.begin_run(10, 2)
        handle.set_step(StepContext(8, 10))  # a reuse step with an empty cache
        with pytest.raises(stepcache.ClockError, match="before it was ever computed"):
            model(z, torch.tensor([1, 1]), y)


def test_apply_twice_and_bad_arguments():
    model = tiny_dit()
    with stepcache.apply(model, FORA(2)):
        with pytest.raises(stepcache.StepcacheError, match="already has"):
            stepcache.apply(model, FORA(3))
    with pytest.raises(stepcache.UnsupportedModelError, match="supported"):
        stepcache.apply(torch.nn.Linear(2, 2), FORA(2))
    with pytest.raises(stepcache.StepcacheError):
        stepcache.apply(model, "fora")


def test_stats_account_macs_and_decisions():
    model = tiny_dit(depth=2)
    z, y = _inputs()
    torch.manual_seed(0)
    _, stats = sample(model, z, y, 6, "ddpm", 1.5, FORA(3), return_stats=True)
    assert stats.nfe == 6
    assert stats.steps() == [5, 4, 3, 2, 1, 0]
    assert set(stats.decisions[5]) == {"0.attn", "0.mlp", "1.attn", "1.mlp"}
    assert stats.decisions[4]["0.mlp"] == 0 and stats.decisions[3]["1.attn"] == model.num_tokens
    assert 1.0 < stats.ideal_speedup < 3.0
    d = stats.as_dict()
    assert d["decisions"]["5"]["0.attn"] == model.num_tokens


def test_sample_validates_inputs():
    model = tiny_dit()
    z, y = _inputs()
    bad = [dict(num_steps=0), dict(sampler="euler"), dict(cfg_scale=0.5)]
    for kw in bad:
        with pytest.raises(stepcache.ConfigError):
            sample(model, z, y, **{"num_steps": 5, **kw})
    with pytest.raises(stepcache.ConfigError):
        sample(model, torch.randn(2, 4, 6, 6), y, 5)
    with pytest.raises(stepcache.ConfigError):
        sample(model, z, torch.tensor([0, 10]), 5)


def test_public_names_resolve():
    for name in stepcache.__all__:
        assert getattr(stepcache, name) is not None
