"""U-ViT, DPM-Solver++(2S) and L2C on two-stage runs: invariants on tiny models, and golden reference latents.

``tests/fixtures/reference_uvit_small.pt`` holds final latents produced by the reference code itself
(horseee/learning-to-cache, U-ViT folder: libs/uvit.py, libs/uvit_dynamic.py, dpm_solver_pp.py) for the
seeded model ``tiny_uvit(**FIXTURE_MODEL)``, written by ``benchmarks/uvit_parity.py --dump-fixture``
(data only, no reference code). Tolerance: 1e-5 relative (the harness measured bit-identical latents;
the margin covers other BLAS builds).
"""

import collections
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import stepcache
from stepcache import FORA, L2C, NoCache, ToCa, UViT, sample
from stepcache.diffusion.discrete_vp import DiscreteVPSchedule, interpolate
from stepcache.errors import ClockError, ConfigError, ModelMismatchError
from stepcache.models.uvit_checkpoints import infer_config, load_uvit
from stepcache.policies.l2c_dpm import staged_active_units, staged_recompute_mask
from stepcache.core.context import StepContext
from stepcache.sampling.dpm_solver import dpm_solver_2s, time_grid
from helpers import tiny_dit, tiny_uvit

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURE = Path(__file__).parent / "fixtures" / "reference_uvit_small.pt"


def inputs(model, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    z = torch.randn(n, c.in_chans, c.img_size, c.img_size, generator=g)  # (n, C, H, W)
    return z, torch.randint(0, model.num_classes - 1, (n,), generator=g)


def saved_router(path, logits):
    """A router file in the reference's format: a bare ordered dict {'i.prob': float32[2 * blocks]}."""
    torch.save(collections.OrderedDict((f"{i}.prob", row.clone()) for i, row in enumerate(logits)), path)
    return path


def network_times(model, fn):
    seen = []
    hook = model.register_forward_pre_hook(lambda _m, args: seen.append(float(args[1][0])))
    try:
        fn()
    finally:
        hook.remove()
    return seen


# ---------------------------------------------------------------------------------------------- model
def test_h2_has_the_official_keys_and_size():
    with torch.device("meta"):
        model = UViT.from_preset("U-ViT-H/2")
    sd = model.state_dict()
    assert len(sd) == 355 and sum(p.numel() for p in model.parameters()) == 500_832_016
    assert sd["pos_embed"].shape == (1, 258, 1152) and sd["label_emb.weight"].shape == (1001, 1152)
    assert sd["in_blocks.0.attn.qkv.weight"].shape == (3456, 1152) and "in_blocks.0.attn.qkv.bias" not in sd
    assert sd["out_blocks.13.skip_linear.weight"].shape == (1152, 2304) and "in_blocks.0.skip_linear.weight" not in sd
    assert not any(k.startswith(("time_embed.", "final_layer.")) for k in sd)
    assert len(model.blocks) == 29 and model.null_label == 1000
    inferred = infer_config(sd)  # what load_uvit reads from an official file's shapes
    assert inferred == {k: v for k, v in vars(model.config).items() if k != "qk_scale"}


def test_presets_and_bad_names():
    with torch.device("meta"):
        small = UViT.from_preset("U-ViT-S/2")
    assert small.num_classes == -1 and small.extras == 1 and small.config.conv
    with pytest.raises(ConfigError):
        UViT.from_preset("U-ViT-XXL/2")
    with pytest.raises(ConfigError):
        UViT(img_size=9, patch_size=2)


def test_unpatchify_inverts_channel_fastest_patches():
    model = tiny_uvit()
    x = torch.randn(2, 4, 8, 8)
    p = model.patch_size
    tokens = x.reshape(2, 4, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 4)  # (B, T, (p1 p2 C))
    assert torch.equal(model.unpatchify(tokens), x)


def test_time_token_changes_output_and_labels_matter():
    model = tiny_uvit()
    z, y = inputs(model)
    with torch.no_grad():
        a = model(z, torch.tensor([500.0, 500.0]), y)
        b = model(z, torch.tensor([500.5, 500.5]), y)  # fractional times are used as given
        c = model(z, torch.tensor([500.0, 500.0]), torch.full_like(y, model.null_label))
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_checkpoint_round_trip_and_inferred_config(tmp_path):
    model = tiny_uvit(depth=4, qkv_bias=True, mlp_time_embed=True)
    torch.save(model.state_dict(), tmp_path / "nnet_ema.pth")
    loaded = load_uvit(tmp_path / "nnet_ema.pth", num_heads=2)
    assert loaded.config == model.config
    z, y = inputs(model)
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        assert torch.equal(loaded(z, t, y), model(z, t, y))
    with pytest.raises(ConfigError):  # width 32 is no official configuration: heads are not in the file
        infer_config(model.state_dict())
    with pytest.raises(ModelMismatchError):
        load_uvit(tmp_path / "nnet_ema.pth", model=tiny_uvit(depth=6))


# ---------------------------------------------------------------------------------------------- schedule, solver
def test_schedule_values_and_inverse():
    ns = DiscreteVPSchedule.scaled_linear()
    assert abs(float(ns.alpha(torch.tensor([1.0]))) - 0.0683) < 1e-4
    t = torch.linspace(0.002, 1.0, 97)
    assert torch.allclose(ns.inverse_lambda(ns.lambda_(t)), t, atol=2e-5)
    xp, fp = torch.tensor([0.0, 1.0, 3.0]), torch.tensor([0.0, 2.0, 3.0])
    x = torch.tensor([-1.0, 0.5, 1.0, 2.0, 4.0])
    assert torch.allclose(interpolate(x, xp, fp), torch.tensor([-2.0, 1.0, 2.0, 2.5, 3.5]))
    inner = torch.rand(50) * 3
    assert torch.allclose(interpolate(inner, xp, fp), torch.from_numpy(np.interp(inner, xp, fp)).float())


def test_solver_is_exact_for_a_constant_denoiser():
    """With x0 known exactly, the probability-flow ODE solution is alpha_t c + (sigma_t / sigma_T)(x_T - alpha_T c)."""
    ns = DiscreteVPSchedule.scaled_linear()
    c = torch.randn(2, 4, 4, 4)
    x_T = torch.randn(2, 4, 4, 4)
    out = dpm_solver_2s(lambda x, t, j, stage: c, ns, x_T, num_steps=7)
    T, e = torch.tensor([1.0]), torch.tensor([1e-3])
    want = ns.alpha(e) * c + ns.sigma(e) / ns.sigma(T) * (x_T - ns.alpha(T) * c)
    assert torch.allclose(out, want, atol=1e-5)


def test_network_times_are_the_reference_float_times():
    model = tiny_uvit()
    z, y = inputs(model)
    seen = network_times(model, lambda: sample(model, z, y, num_steps=10, sampler="dpm-solver++2s", cfg_scale=1.4))
    assert len(seen) == 20  # one batched [cond; uncond] call per evaluation
    assert seen[0] == 1000.0 and seen[2] == pytest.approx(900.1, abs=1e-3)
    assert seen[1] == pytest.approx(951.84, abs=1e-2) and seen[-1] == pytest.approx(11.40, abs=1e-2)
    assert seen[::2] == [float(v) for v in time_grid(10)[:-1] * 1000]
    seen50 = network_times(model, lambda: sample(model, z, y, num_steps=25, sampler="dpm-solver++2s", cfg_scale=1.4))
    assert seen50[-1] == pytest.approx(6.70, abs=1e-2)


def test_golden_reference_latents():
    data = torch.load(FIXTURE, weights_only=True)
    model = tiny_uvit(**data["model"])
    z, y, scale = data["noise"], data["labels"], data["scale"]

    def close(ours, theirs):
        assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5

    close(sample(model, z, y, num_steps=5, sampler="dpm-solver++2s", cfg_scale=1 + scale), data["plain"])
    for thres in (0.1, 0.9):
        policy = L2C(data["router"], threshold=thres)
        close(sample(model, z, y, num_steps=5, sampler="dpm-solver++2s", cfg_scale=1 + scale, policy=policy),
              data[f"l2c_{thres}"])


def test_uvit_under_ddim_and_ddpm_and_dit_under_dpm_solver():
    model = tiny_uvit()
    z, y = inputs(model)
    seen = network_times(model, lambda: sample(model, z, y, num_steps=10, sampler="ddim", cfg_scale=1.4))
    assert seen[0] == 1000.0 and seen[-1] == 1.0  # U-ViT counts noise steps 1..1000
    out = sample(model, z, y, num_steps=5, sampler="ddpm", cfg_scale=1.4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    dit = tiny_dit()
    zd, yd = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    seen = network_times(dit, lambda: sample(dit, zd, yd, num_steps=4, sampler="dpm-solver++2s", cfg_scale=1.5))
    assert len(seen) == 8 and seen[0] == pytest.approx(999.0)  # DiT's index n - 1
    with pytest.raises(ConfigError):
        sample(model, z, y, num_steps=4, sampler="dpm-solver++3m")
    with pytest.raises(ConfigError):
        sample(model, z, torch.tensor([0, 1000]), num_steps=4, sampler="dpm-solver++2s")  # 1000 is the null label


# ---------------------------------------------------------------------------------------------- L2C
def router_for(model, num_steps, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * num_steps, 2 * len(model.blocks), generator=g) * scale  # (2N, 2 * blocks)


def run(model, z, y, num_steps, policy, cfg_scale=1.4):
    return sample(model, z, y, num_steps=num_steps, sampler="dpm-solver++2s", cfg_scale=cfg_scale, policy=policy,
                  return_stats=True)


def expected_mac_ratio(model, logits, threshold, num_steps, rows):
    """Executed / uncached MACs from the schedule alone: step starts j >= 1 run only their kept units."""
    from stepcache.adapters.uvit import uvit_macs

    macs, L = uvit_macs(model), model.num_tokens
    unit = [macs["attn"](L), macs["mlp"](L)]
    keep = staged_recompute_mask(logits, threshold, num_steps)  # (N, U)
    full_call = macs["fixed"] + len(model.blocks) * sum(unit)
    executed = num_steps * full_call + sum(
        macs["fixed"] + sum(unit[u % 2] for u in range(keep.shape[1]) if keep[j, u]) for j in range(num_steps))
    return executed / (2 * num_steps * full_call)


@pytest.mark.parametrize("cfg_scale", [1.4, 1.0])
def test_l2c_schedule_follows_the_clock(cfg_scale):
    model = tiny_uvit()
    z, y = inputs(model)
    logits = router_for(model, 5)
    plain, _ = run(model, z, y, 5, NoCache(), cfg_scale)
    out, stats = run(model, z, y, 5, L2C(logits, threshold=0.5), cfg_scale)
    assert stats.nfe == 10
    assert stats.mac_ratio == pytest.approx(expected_mac_ratio(model, logits, 0.5, 5, z.shape[0]), rel=1e-12)
    assert not torch.allclose(out, plain)  # caching matters on this model


def test_l2c_keeping_every_unit_is_exact_and_runs_reproduce():
    model = tiny_uvit()
    z, y = inputs(model)
    plain, _ = run(model, z, y, 5, None)
    keep_all = torch.full((10, 2 * len(model.blocks)), 20.0)
    out, stats = run(model, z, y, 5, L2C(keep_all, threshold=0.9))
    assert torch.equal(out, plain) and stats.mac_ratio == 1.0
    policy = L2C(router_for(model, 5), threshold=0.9)
    first, _ = run(model, z, y, 5, policy)
    second, _ = run(model, z, y, 5, policy)
    assert torch.equal(first, second)
    rows = [run(model, z[k:k + 1], y[k:k + 1], 5, policy)[0] for k in range(2)]
    assert torch.allclose(torch.cat(rows), first, atol=1e-5)


def test_reference_router_file_and_mismatches(tmp_path):
    model = tiny_uvit()
    logits = router_for(model, 5)
    policy = L2C.from_checkpoint(saved_router(tmp_path / "dpm10_router.pth", logits), threshold=0.9)
    assert torch.equal(policy.logits(), logits)
    z, y = inputs(model)
    with pytest.raises(ModelMismatchError):  # 10 rows: one per evaluation of a 5-step run, not 4
        run(model, z, y, 4, policy)
    with pytest.raises(ModelMismatchError):
        run(tiny_uvit(depth=6), z, y, 5, policy)
    counts = staged_active_units(logits, 0.9)
    keep = torch.sigmoid(logits[1:5]) > 0.9
    assert counts["total"] == 4 * logits.shape[1] and counts["active"] == int(keep.sum())
    assert counts["attn_active"] == int(keep[:, 0::2].sum()) and list(counts["per_step"]) == [1, 2, 3, 4]


def test_stage_outside_a_two_stage_run_is_a_clock_error():
    model = tiny_uvit()
    handle = stepcache.apply(model, NoCache())
    try:
        handle.begin_run(4, 2)
        with pytest.raises(ClockError):
            handle.set_step(StepContext(i=3, num_steps=4, stage=1))
    finally:
        handle.remove()


@pytest.mark.parametrize("sampler", ["dpm-solver++2s", "ddim"])
def test_other_policies_run_on_uvit(sampler):
    model = tiny_uvit()
    z, y = inputs(model)
    from stepcache import DBCache, FBCache, Forecast, MagCache, TaylorSeer

    steps = 6
    base = sample(model, z, y, num_steps=steps, sampler=sampler, cfg_scale=1.4)
    for policy in (FORA(2), ToCa(interval=2, fresh_ratio=0.3), TaylorSeer(interval=2, order=1),
                   Forecast(num_full=3, order=1), FBCache(threshold=10.0), DBCache(front=1, threshold=10.0, warmup=1),
                   MagCache(threshold=10.0, retention_ratio=0.0, mag_ratios=(1.0,) * steps)):
        out, stats = sample(model, z, y, num_steps=steps, sampler=sampler, cfg_scale=1.4, policy=policy,
                            return_stats=True)
        assert torch.isfinite(out).all() and stats.mac_ratio < 1.0 and math.isfinite(stats.ideal_speedup), policy
        assert not torch.equal(out, base), policy
    with pytest.raises(stepcache.ConfigError, match="modulated input"):  # U-ViT has no timestep-modulated input
        sample(model, z, y, num_steps=steps, sampler=sampler, cfg_scale=1.4,
               policy=stepcache.TeaCache(threshold=0.1, coefficients=(0.0, 0.0, 0.0, 1.0, 0.0)))


# ---------------------------------------------------------------------------------------------- training
def test_trained_router_beats_random_placement():
    from stepcache.training.l2c_data import RouterData
    from stepcache.training.l2c_dpm import (StagedRouterTrainConfig, random_placement, staged_router_error,
                                                  train_staged_router)

    model = tiny_uvit(depth=4)
    g = torch.Generator().manual_seed(0)
    data = RouterData(torch.randn(32, 4, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g))
    cfg = StagedRouterTrainConfig(num_steps=4, iters=80, batch_size=4, lr=0.1, l1_weight=0.5, threshold=0.5)
    result = train_staged_router(model, data, cfg)
    assert result.logits.shape == (8, 10) and all(p.requires_grad for p in model.parameters())
    counts = staged_active_units(result.logits, 0.5)
    assert 0 < counts["active"] < counts["total"]
    trained = staged_router_error(model, data, result.logits, cfg, 0.5)
    rand = [staged_router_error(model, data, random_placement(result.logits, counts["active"], s), cfg, 0.5)
            for s in range(3)]
    assert trained < min(rand)


def test_cli_trains_and_samples_a_uvit(tmp_path, monkeypatch, capsys):
    from stepcache.cli.main import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt, data = tmp_path / "nnet_ema.pth", tmp_path / "latents.pt"
    torch.save(tiny_uvit(depth=2, embed_dim=512, heads=8, num_classes=1001).state_dict(), ckpt)
    torch.save({"x": torch.randn(8, 4, 8, 8), "y": torch.randint(0, 1000, (8,))}, data)
    router = tmp_path / "router.safetensors"
    assert main(["train-router", "--model", "U-ViT", "--ckpt", str(ckpt), "--data", str(data), "--num-steps", "2",
                 "--lambda", "0.1", "--iters", "2", "--batch-size", "2", "--threshold", "0.5", "--out", str(router),
                 "--no-progress"]) == 0
    assert L2C.from_checkpoint(router).logits().shape == (4, 6)
    out = tmp_path / "out"
    assert main(["sample", "--model", "U-ViT", "--ckpt", str(ckpt), "--sampler", "dpm-solver++2s",
                 "--num-sampling-steps", "2", "--cfg-scale", "1.4", "--class-labels", "1", "--cache", "l2c",
                 "--router", str(router), "--no-baseline", "--out-dir", str(out)]) == 0
    assert "4 model calls" in capsys.readouterr().out
    assert main(["sample", "--model", "U-ViT-H/2", "--out-dir", str(out)]) == 2  # no --ckpt: one sentence


def test_remove_restores_the_plain_forward():
    model = tiny_uvit()
    z, y = inputs(model)
    t = torch.tensor([500.0, 20.5])
    with torch.no_grad():
        before = model(z, t, y)
        handle = stepcache.apply(model, L2C(router_for(model, 5), threshold=0.5))
        with pytest.raises(ClockError):  # outside a sampling run the cached model refuses to guess the step
            model(z, t, y)
        handle.remove()
        assert torch.equal(model(z, t, y), before)
