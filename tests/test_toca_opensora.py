"""ToCa's OpenSora variant on STDiT3: the reference's outputs, schedules, token counts and compute model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import stepcache
from stepcache.adapters.stdit3 import stdit3_macs
from stepcache.errors import ConfigError
from stepcache.models.stdit3 import PRESETS, STDiT3
from stepcache.policies.toca_opensora import OpenSoraToCaPolicy, ideal_speedup, schedule_table
from tests.stdit3_helpers import tiny_stdit3, video_inputs

SIZES = dict(height=240.0, width=426.0, num_frames=51.0, fps=24.0)
FIXTURE = Path(__file__).parent / "fixtures" / "opensora_reference_tiny.pt"


def run(model, policy, steps: int, n: int = 1, **kw):
    z, y, mask = video_inputs(model, n, **kw)
    return stepcache.sample(model, z, y, num_steps=steps, sampler="rflow", cfg_scale=7.0, policy=policy, mask=mask,
                            return_stats=True, **SIZES)


def test_matches_the_reference_code_fixture():
    """Final latents of the reference (ToCa's Open-Sora folder, run itself by benchmarks/opensora_parity.py
    on the same tiny model and inputs): bit-identical there; 1e-5 relative here for other BLAS builds."""
    ref = torch.load(FIXTURE)
    model = tiny_stdit3(0)
    for name, policy in (("uncached", None), ("toca", stepcache.ToCa())):
        out, _ = run(model, policy, ref["steps"])
        scale = ref[name].abs().max()
        assert (out - ref[name]).abs().max() / scale < 1e-5, name
    assert not torch.allclose(ref["uncached"], ref["toca"], atol=1e-3)  # caching did change the result


def test_defaults_and_the_handler_dispatch():
    model = tiny_stdit3(0)
    with stepcache.apply(model, stepcache.ToCa()) as handle:
        handler = handle.handler
        assert isinstance(handler, OpenSoraToCaPolicy)
        cfg = handler.config
        assert (cfg.fresh_ratio, cfg.schedule, cfg.score, cfg.staleness_weight, cfg.interval) == \
            (0.1, None, "attention", 0.25, 3)  # schedule None: the reference's "ToCa" schedule


@pytest.mark.parametrize("steps, sa, ca", [
    (10, [0, 1, 2, 3, 6, 9], [0, 1, 2, 6]),
    (30, [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27], [0, 1, 2, 6, 12, 18, 24]),
])
def test_full_steps_and_token_counts_of_the_spec(steps, sa, ca):
    model = tiny_stdit3(0)
    _, stats = run(model, stepcache.ToCa(), steps, latent=(4, 4, 6, 10))  # N = 4 * 3 * 5 = 60 tokens
    up = lambda ids: sorted(steps - 1 - i for i in ids)  # noqa: E731  (steps count up in the spec)
    assert up(stats.full_steps("attn")) == sa and up(stats.full_steps("mlp")) == sa
    assert up(stats.full_steps("cross")) == ca
    k = int(torch.tensor(0.1 * 1.495, dtype=torch.float32) * 60)  # 8 of 60
    for i, per_layer in stats.layer_tokens("mlp").items():
        assert set(per_layer) == ({60} if steps - 1 - i in sa else {k})
    for i, per_layer in stats.layer_tokens("cross").items():
        assert set(per_layer) == ({60} if steps - 1 - i in ca else {0})
    assert len(stats.layer_tokens("mlp")[0]) == 2 * model.depth  # spatial and temporal blocks
    assert schedule_table(stepcache.ToCa(), 30, 23850)[4] == {"attn": 0, "cross": 0, "mlp": 3565}
    assert schedule_table(stepcache.ToCa(), 30, 6075)[4]["mlp"] == 908


def test_runtime_accounting_equals_the_compute_model():
    model = tiny_stdit3(0)
    latent = (4, 4, 6, 10)
    _, stats = run(model, stepcache.ToCa(), 12, latent=latent)
    z, y, mask = video_inputs(model, 1)
    text_len = float(mask.sum())
    macs = stdit3_macs(model.config, 4, 3, 5, text_len)
    assert stats.ideal_speedup == pytest.approx(ideal_speedup(macs, model.depth, 12, 60, stepcache.ToCa()), rel=1e-12)


@pytest.mark.parametrize("geometry, want, with_embeddings",
                         [((15, 30, 53), 2.363, 2.363), ((15, 15, 27), 2.349, 2.348)])
def test_compute_model_of_the_spec_at_480p_and_240p(geometry, want, with_embeddings):
    """STDiT3-XL/2, 30 steps, 51 frames (15 latent frames), 9:16, 100 text tokens per row: the spec's model
    (blocks and text k|v) and the runtime's full accounting (embeddings and final layer too)."""
    with torch.device("meta"):
        config = STDiT3.from_preset("STDiT3-XL/2").config
    assert config["depth"] == PRESETS["STDiT3-XL/2"]["depth"]
    T, Hp, Wp = geometry
    macs = stdit3_macs(config, T, Hp, Wp, 100)
    assert round(ideal_speedup(macs, 28, 30, T * Hp * Wp, stepcache.ToCa(), embeddings=False), 3) == want
    assert round(ideal_speedup(macs, 28, 30, T * Hp * Wp, stepcache.ToCa()), 3) == with_embeddings
    lengths = [ideal_speedup(stdit3_macs(config, 15, 30, 53, L), 28, 30, 23850, stepcache.ToCa(), embeddings=False)
               for L in (30, 300)]
    assert [round(x, 3) for x in lengths] == [2.356, 2.383]  # the spec's range over text lengths


def test_near_reference_options_and_other_policies_run():
    model = tiny_stdit3(0)
    base, _ = run(model, None, 5)
    l2c = stepcache.L2C(torch.full((5, 2 * 2 * model.depth), -5.0))  # a router reusing attn/mlp on cache steps
    for policy in (stepcache.ToCa(score="similarity", schedule="constant"), stepcache.FORA(2), l2c):
        out, stats = run(model, policy, 5)
        assert torch.isfinite(out).all() and stats.ideal_speedup > 1.1
        assert not torch.equal(out, base)
    same, stats = run(model, stepcache.FORA(1), 5)
    assert torch.equal(same, base) and stats.ideal_speedup == 1.0


def test_remove_restores_the_plain_model():
    model = tiny_stdit3(0)
    z, y, mask = video_inputs(model, 1)
    kw = dict(mask=mask, fps=torch.tensor([24.0]), height=torch.tensor([240.0]), width=torch.tensor([426.0]))
    t = torch.tensor([500.0])
    before = model(z, t, y, **kw)
    run(model, stepcache.ToCa(), 4)
    assert torch.equal(model(z, t, y, **kw), before)
    assert "forward" not in model.__dict__


def test_options_the_reference_lacks_raise_config_error():
    model = tiny_stdit3(0)
    for policy in (stepcache.ToCa(score="kv-norm"), stepcache.ToCa(score="compress"), stepcache.ToCa(bonus=0.6),
                   stepcache.ToCa(schedule="ToCa-ddim50")):
        with pytest.raises(ConfigError):
            stepcache.apply(model, policy)


def test_adapter_declares_per_group_geometry():
    """Spatial blocks (even layers) attend within T frames of S tokens, temporal ones within S positions of T."""
    from stepcache.adapters.stdit3 import token_groups

    T, S, D = 5, 12, 32
    assert token_groups(0, T, S) == (T, S) and token_groups(1, T, S) == (S, T)
    macs = stdit3_macs(tiny_stdit3(0).config, T, 3, 4, 4.0)
    N = T * S
    assert macs["attn"](0, N) - 4 * N * D * D == 2 * N * S * D
    assert macs["attn"](1, N) - 4 * N * D * D == 2 * N * T * D
    assert macs["attn"](0, 0) == 0 and macs["mlp"](1, 3) == 2 * 3 * D * 4 * D


def test_toca_in_bf16_runs():
    model = tiny_stdit3(0).to(torch.bfloat16)
    out, stats = run(model, stepcache.ToCa(), 7)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and stats.ideal_speedup > 1.2
