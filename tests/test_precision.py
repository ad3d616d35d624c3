"""bf16 / fp16: the native DiT, U-ViT, the samplers and every policy run in the model's dtype (issue 12)."""

from __future__ import annotations

import pytest
import torch

import stepcache
from helpers import tiny_dit, tiny_uvit
from stepcache.core.policy import PolicyConfig
from stepcache.sampling.precision import at_boundary, model_dtype, state_dtype

HALF = (torch.bfloat16, torch.float16)
# every method that runs on a tiny DiT with its defaults (L2C needs a router, MagCache/TeaCache calibration)
METHODS = ({"method": "fora", "interval": 3}, {"method": "toca"}, {"method": "toca", "forecast": True},
           {"method": "taylorseer"}, {"method": "forecast"}, {"method": "fbcache"},
           {"method": "dbcache", "front": 1, "back": 1})


def _inputs(dtype, n=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, 8, 8, generator=g).to(dtype), torch.arange(n)


def _block_dtypes(model):
    """Hooks recording the dtype of every block output (a float32 cache would promote the stream)."""
    seen = set()
    hooks = [b.register_forward_hook(lambda m, i, o: seen.add(o.dtype)) for b in model.blocks]
    return seen, hooks


@pytest.mark.parametrize("dtype", HALF)
def test_half_uncached_and_fora_run_in_model_dtype(dtype):
    model = tiny_dit().to(dtype)
    noise, labels = _inputs(dtype)
    seen, hooks = _block_dtypes(model)
    for policy in (None, stepcache.FORA(3)):
        out = stepcache.sample(model, noise, labels, num_steps=8, sampler="ddim", policy=policy)
        assert out.dtype == dtype and torch.isfinite(out).all()
    for h in hooks:
        h.remove()
    assert seen == {dtype}


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm-solver++2s"])
def test_bf16_fora1_equals_uncached_bit_for_bit(sampler):
    model = tiny_dit().to(torch.bfloat16)
    noise, labels = _inputs(torch.bfloat16)
    outs = []
    for policy in (None, stepcache.FORA(1)):
        outs.append(stepcache.sample(model, noise, labels, num_steps=6, sampler=sampler, policy=policy,
                                     generator=torch.Generator().manual_seed(1)))
    assert torch.equal(outs[0], outs[1])


def test_bf16_caching_changes_the_output_and_stays_close():
    """FORA(3) in bf16 reuses something (differs from uncached) yet tracks it like float32 FORA(3) does."""
    model32 = tiny_dit()
    noise, labels = _inputs(torch.float32)
    ref32 = stepcache.sample(model32, noise, labels, num_steps=9, sampler="ddim")
    model16 = tiny_dit().to(torch.bfloat16)
    base = stepcache.sample(model16, noise.bfloat16(), labels, num_steps=9, sampler="ddim").float()
    fora = stepcache.sample(model16, noise.bfloat16(), labels, num_steps=9, sampler="ddim",
                            policy=stepcache.FORA(3)).float()
    assert not torch.equal(base, fora)
    scale = ref32.abs().mean()
    assert (base - ref32).abs().mean() < 0.1 * scale  # bf16 uncached tracks float32


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("spec", METHODS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_every_policy_runs_in_half(dtype, spec):
    model = tiny_dit().to(dtype)
    noise, labels = _inputs(dtype)
    seen, hooks = _block_dtypes(model)
    out = stepcache.sample(model, noise, labels, num_steps=8, sampler="ddim", policy=PolicyConfig.from_dict(spec))
    for h in hooks:
        h.remove()
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert seen == {dtype}


@pytest.mark.parametrize("spec", METHODS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_every_policy_runs_on_uvit_in_bf16(spec):
    model = tiny_uvit().to(torch.bfloat16)
    noise, _ = _inputs(torch.bfloat16)
    seen, hooks = _block_dtypes(model)
    out = stepcache.sample(model, noise, torch.tensor([1, 2]), num_steps=6, sampler="ddim",
                           policy=PolicyConfig.from_dict(spec))
    for h in hooks:
        h.remove()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert seen == {torch.bfloat16}


def test_float32_noise_with_bf16_model_returns_float32():
    model = tiny_dit().to(torch.bfloat16)
    noise, labels = _inputs(torch.float32)
    out = stepcache.sample(model, noise, labels, num_steps=4, sampler="ddim")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_boundary_helpers():
    assert model_dtype(tiny_dit().to(torch.float16)) == torch.float16
    assert state_dtype(torch.zeros(1, dtype=torch.bfloat16)) == torch.float32
    assert state_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64
    fn = lambda x: x * 2  # noqa: E731
    assert at_boundary(fn, torch.float32, torch.float32) is fn  # float32: no cast, bit for bit the old path
    out = at_boundary(lambda x: (x.dtype, x)[1], torch.bfloat16, torch.float32)(torch.ones(2))
    assert out.dtype == torch.float32
