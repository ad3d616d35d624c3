"""DiT's respaced schedule and golden latents of the reference sampling code (DiT, arXiv 2212.09748).

``tests/fixtures/reference_dit_small.pt`` holds latents produced by the reference implementation
(facebookresearch/DiT ``p_sample_loop`` / ``ddim_sample_loop`` with ``forward_with_cfg``) for a tiny
seeded model; ``benchmarks/reference_parity.py --dump-fixture`` wrote it. It stores data only: the
model is rebuilt here by ``tests.helpers.tiny_dit`` from the recorded settings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import stepcache
from stepcache.diffusion.schedule import Diffusion, linear_betas, respaced_timesteps

from helpers import tiny_dit

FIXTURE = Path(__file__).parent / "fixtures" / "reference_dit_small.pt"


@pytest.mark.parametrize("steps,head,tail", [
    (250, [0, 4, 8, 12], [991, 995, 999]),
    (50, [0, 20, 41, 61], [958, 979, 999]),
    (20, [0, 53, 105], [894, 946, 999]),
])
def test_respacing_matches_dit(steps, head, tail):
    kept = respaced_timesteps(steps)
    assert len(kept) == steps
    assert kept[: len(head)] == head and kept[-len(tail):] == tail
    assert kept == sorted(round(k * 999 / (steps - 1)) for k in range(steps))


def test_respaced_betas_reproduce_kept_alphas_cumprod():
    d = Diffusion(50)
    base = np.cumprod(1.0 - linear_betas())
    np.testing.assert_allclose(d.alphas_cumprod, base[d.timestep_map], rtol=1e-12)
    assert d.timestep_map[0] == 0 and d.timestep_map[-1] == 999


def test_full_schedule_is_the_linear_one():
    d = Diffusion(1000)
    np.testing.assert_array_equal(d.timestep_map, np.arange(1000))
    np.testing.assert_allclose(d.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-9)


@pytest.fixture(scope="module")
def golden():
    data = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    return data, tiny_dit(**data["model"])


def _ours(model, data, sampler: str, cfg: float):
    torch.manual_seed(data["rng_seed"])
    return stepcache.sample(model, data["noise"], data["labels"], num_steps=data["steps"], sampler=sampler,
                            cfg_scale=cfg)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_reproduces_reference_latents(golden, sampler):
    data, model = golden
    out = _ours(model, data, sampler, data["cfg_scale"])
    assert out.shape == data[sampler].shape
    torch.testing.assert_close(out, data[sampler], atol=1e-6, rtol=0)


def test_unguided_ddpm_reproduces_reference_latents(golden):
    data, model = golden
    torch.testing.assert_close(_ours(model, data, "ddpm", 1.0), data["ddpm_nocfg"], atol=1e-6, rtol=0)


def test_golden_check_is_sensitive(golden):
    """A different per-step noise stream must move the DDPM result well beyond the tolerance."""
    data, model = golden
    torch.manual_seed(data["rng_seed"] + 1)
    other = stepcache.sample(model, data["noise"], data["labels"], num_steps=data["steps"], sampler="ddpm",
                             cfg_scale=data["cfg_scale"])
    assert (other - data["ddpm"]).abs().max() > 1e-3
