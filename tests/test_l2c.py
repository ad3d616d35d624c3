"""Learning-to-Cache: unit counting, router files, exactness against a hand-written loop, training."""

import argparse
import collections
import fractions
import json

import numpy as np
import pytest
import torch

import stepcache
from stepcache import L2C, sample
from stepcache.diffusion.schedule import Diffusion
from stepcache.policies.l2c import active_units, cache_steps, load_router, save_router
from stepcache.training.l2c_data import RouterData
from stepcache.training.l2c_report import expected_macs, format_table, heatmap, model_for_macs, router_report
from stepcache.training.l2c import RouterTrainConfig, router_mse, train_router
from stepcache.sampling.guidance import guided_forward
from stepcache.sampling.samplers import ddim_step
from helpers import tiny_dit


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_router(steps, depth, attn_active, mlp_active, seed=0):
    """Logits +-5 placing exactly the given numbers of active units on the cache steps; odd rows random."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(steps, 2 * depth, generator=g)  # full-step rows: must not count
    rows = cache_steps(steps)
    for offset, count in ((0, attn_active), (1, mlp_active)):
        slots = [(i, 2 * l + offset) for i in rows for l in range(depth)]
        chosen = set(torch.randperm(len(slots), generator=g)[:count].tolist())
        for k, (i, u) in enumerate(slots):
            logits[i, u] = 5.0 if k in chosen else -5.0
    return logits


def save_reference(path, logits, args=None, bare=False):
    routers = collections.OrderedDict((f"{i}.prob", row.clone()) for i, row in enumerate(logits))
    if bare:
        torch.save(routers, path)
        return path
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, weight_decay=0).state_dict()
    args = args or argparse.Namespace(model="DiT-XL/2", lr=1e-3, l1=5e-6, num_sampling_steps=len(logits))
    torch.save({"routers": routers, "opt": opt, "args": args}, path)
    return path


# ------------------------------------------------------------------------------------ counting
@pytest.mark.parametrize("steps,attn,mlp,share", [(20, 157, 155, 44.3), (50, 371, 365, 47.43)])
def test_active_unit_counting_matches_spec_figures(steps, attn, mlp, share):
    counts = active_units(synthetic_router(steps, 28, attn, mlp), 0.1)
    assert counts["total"] == 2 * 28 * steps // 2 == (560 if steps == 20 else 1400)
    assert (counts["active"], counts["attn_active"], counts["mlp_active"]) == (attn + mlp, attn, mlp)
    assert round(100 * counts["skipped_share"], 2 if steps == 50 else 1) == share
    assert sorted(counts["per_step"]) == list(range(0, steps, 2))


def test_sampling_decisions_follow_the_router():
    logits = synthetic_router(20, 28, 157, 155, seed=3)
    model = tiny_dit(depth=28, hidden=16, heads=2, input_size=4)
    z, y = torch.randn(1, 4, 4, 4), torch.tensor([1])
    _, stats = sample(model, z, y, num_steps=20, sampler="ddim", cfg_scale=1.5, policy=L2C(logits), return_stats=True)
    skipped = sum(k == 0 for i in stats.steps() for k in stats.decisions[i].values())
    assert skipped == 560 - 312
    assert stats.full_steps() == list(range(19, 0, -2))  # odd steps compute everything
    for i in cache_steps(20):
        for l in range(28):
            assert (stats.tokens(i, f"{l}.attn") > 0) == bool(logits[i, 2 * l] > 0)
            assert (stats.tokens(i, f"{l}.mlp") > 0) == bool(logits[i, 2 * l + 1] > 0)


def test_threshold_is_monotone():
    logits = torch.randn(20, 56, generator=torch.Generator().manual_seed(1)) * 3
    actives = [active_units(logits, th)["active"] for th in np.linspace(0, 1, 41)]
    assert all(a >= b for a, b in zip(actives, actives[1:]))
    assert actives[0] == 560 and actives[-1] == 0


# ------------------------------------------------------------------------------------ files
def test_reference_format_loads_with_namespace(tmp_path):
    logits = torch.randn(20, 56).clamp(-5, 5)
    cfg = L2C.from_checkpoint(save_reference(tmp_path / "DDIM20_router.pt", logits))
    assert torch.equal(cfg.logits(), logits) and cfg.threshold == 0.1 and cfg.num_steps == 20 and cfg.depth == 28
    bare = L2C.from_checkpoint(save_reference(tmp_path / "uvit.pth", logits[:10, :8], bare=True), threshold=0.3)
    assert torch.equal(bare.logits(), logits[:10, :8]) and bare.threshold == 0.3


class Planted:
    """Unpickling this would create a file: the loader must refuse before that happens."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_with_other_classes_is_refused(tmp_path):
    marker = tmp_path / "executed"
    path = save_reference(tmp_path / "evil.pt", torch.zeros(4, 4), args=Planted(marker))
    with pytest.raises(stepcache.CheckpointError, match="refusing"):
        L2C.from_checkpoint(path)
    assert not marker.exists()
    torch.save({"routers": {"0.prob": torch.zeros(4)}, "args": fractions.Fraction(1, 3)}, tmp_path / "c.pt")
    with pytest.raises(stepcache.CheckpointError, match="Fraction"):
        L2C.from_checkpoint(tmp_path / "c.pt")


def test_own_format_round_trip(tmp_path):
    logits = torch.randn(10, 8)
    meta = save_router(tmp_path / "r.safetensors", logits, model={"name": "tiny"}, sampler="ddim", threshold=0.25,
                       **{"lambda": 1e-6})
    back, meta2 = load_router(tmp_path / "r.safetensors")
    assert torch.equal(back, logits) and meta2 == json.loads(json.dumps(meta))
    assert meta2["depth"] == 4 and meta2["num_steps"] == 10 and meta2["lambda"] == 1e-6
    assert L2C.from_checkpoint(tmp_path / "r.safetensors").threshold == 0.25  # the file's threshold
    assert L2C.from_checkpoint(tmp_path / "r.safetensors", threshold=0.1).threshold == 0.1
    sidecar = json.loads((tmp_path / "r.json").read_text())
    assert sidecar["units"]["total"] == 5 * 8
    cfg = L2C(logits, 0.2)
    assert stepcache.PolicyConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert hash(cfg) == hash(L2C(logits.tolist(), 0.2))


def test_corrupt_and_wrong_files_raise_clearly(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    good = tmp_path / "good.safetensors"
    save_router(good, torch.randn(4, 4))
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:40])
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    torch.save({"routers": {"0.prob": torch.zeros(4), "2.prob": torch.zeros(4)}}, tmp_path / "gap.pt")
    for name, match in [("junk.pt", "corrupt"), ("cut.safetensors", "not a readable"), ("other.pt", "unexpected"),
                        ("gap.pt", "one router per step"), ("missing.pt", "does not exist")]:
        with pytest.raises(stepcache.CheckpointError, match=match):
            L2C.from_checkpoint(tmp_path / name)
    for bad in ([[0.0, 1.0, 2.0]], [], [[0.0, float("nan")]]):
        with pytest.raises(stepcache.ConfigError):
            L2C(bad)
    with pytest.raises(stepcache.ConfigError):
        L2C(torch.zeros(2, 2), threshold=1.5)


def test_wrong_depth_or_step_count_is_refused():
    model = tiny_dit(depth=2, hidden=32, heads=2, input_size=4)
    z, y = torch.randn(1, 4, 4, 4), torch.tensor([0])
    with pytest.raises(stepcache.ModelMismatchError, match="3-layer.*2 layers"):
        stepcache.apply(model, L2C(torch.zeros(10, 6)))
    with pytest.raises(stepcache.ModelMismatchError, match="10 sampling steps.*has 8"):
        sample(model, z, y, num_steps=8, sampler="ddim", policy=L2C(torch.zeros(10, 4)))
    assert getattr(model, "_stepcache_handle", None) is None  # removed despite the error


# ------------------------------------------------------------------------------------ exactness
def _independent_l2c(model, z, y, steps, logits, threshold, cfg):
    """The reference's dynamic forward written out by hand: odd steps reset the cache, even steps reuse
    unit u of layer l unless sigmoid(prob[i][u]) > threshold."""
    diffusion = Diffusion(steps)
    active = [set(torch.nonzero(torch.sigmoid(r) > threshold).flatten().tolist()) for r in logits]
    n = z.shape[0]
    x, yy = torch.cat([z, z]), torch.cat([y, torch.full_like(y, model.num_classes)])
    feats = [None] * len(model.blocks)

    def forward(xin, t, labels):
        h, c = model.embed(xin, t, labels)
        for l, blk in enumerate(model.blocks):
            s1, sc1, g1, s2, sc2, g2 = blk.modulation(c)
            reuse_a = feats[l] is not None and 2 * l not in active[i]
            a = feats[l][0] if reuse_a else blk.attn_branch(h, s1, sc1)
            h = h + g1.unsqueeze(1) * a
            reuse_m = feats[l] is not None and 2 * l + 1 not in active[i]
            m = feats[l][1] if reuse_m else blk.mlp_branch(h, s2, sc2)
            h = h + g2.unsqueeze(1) * m
            feats[l] = (a, m)
        return model.unpatchify(model.final_layer(h, c))

    with torch.no_grad():
        for i in range(steps - 1, -1, -1):
            if i % 2 == 1:
                feats = [None] * len(model.blocks)
            it = torch.full((2 * n,), i, dtype=torch.long)
            out = guided_forward(forward, x, diffusion.model_timesteps(it), yy, cfg)
            x = ddim_step(diffusion, out, x, it)
    return x[:n]


@pytest.mark.parametrize("steps", [10, 9])
def test_random_router_matches_independent_loop(steps):
    model = tiny_dit(depth=3)
    logits = torch.randn(steps, 6, generator=torch.Generator().manual_seed(2)) * 2
    z, y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 7])
    ours = sample(model, z, y, num_steps=steps, sampler="ddim", cfg_scale=1.5, policy=L2C(logits, 0.3))
    ref = _independent_l2c(model, z, y, steps, logits, 0.3, 1.5)
    assert torch.equal(ours, ref)


def test_all_plus_five_is_no_cache_and_all_minus_five_reuses_everything():
    model = tiny_dit(depth=3)
    z, y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    base = sample(model, z, y, num_steps=10, sampler="ddim", cfg_scale=1.5)
    keep, stats = sample(model, z, y, 10, "ddim", 1.5, L2C(torch.full((10, 6), 5.0)), return_stats=True)
    assert torch.equal(base, keep) and stats.mac_ratio == 1.0
    skip, stats = sample(model, z, y, 10, "ddim", 1.5, L2C(torch.full((10, 6), -5.0)), return_stats=True)
    assert torch.equal(skip, _independent_l2c(model, z, y, 10, torch.full((10, 6), -5.0), 0.1, 1.5))
    assert not torch.allclose(skip, base)
    assert all(k == 0 for i in cache_steps(10) for k in stats.decisions[i].values())
    assert stats.full_steps() == [9, 7, 5, 3, 1]


# ------------------------------------------------------------------------------------ training
def _train_setup():
    model = tiny_dit(depth=2, hidden=32, heads=2, input_size=8)
    with torch.no_grad():  # larger weights: step-to-step changes well above float noise
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3)
    g = torch.Generator().manual_seed(0)
    return model, RouterData(torch.randn(16, 4, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))


def test_training_lowers_the_loss_and_lambda_skips_more():
    model, data = _train_setup()
    base = RouterTrainConfig(num_steps=6, lam=0.0, lr=0.2, iters=24, batch_size=4)
    start = train_router(model, data, RouterTrainConfig(**{**base.__dict__, "iters": 1}), progress=False)
    plain = train_router(model, data, base, progress=False)
    sparse = train_router(model, data, RouterTrainConfig(**{**base.__dict__, "lam": 1e-5}), progress=False)
    assert router_mse(model, data, plain.logits, base) < router_mse(model, data, start.logits, base)
    assert active_units(sparse.logits, 0.5)["skipped_share"] > active_units(plain.logits, 0.5)["skipped_share"]
    assert torch.sigmoid(sparse.logits[::2]).mean() < torch.sigmoid(plain.logits[::2]).mean()
    assert sparse.logits.abs().max() <= 5.0
    assert all(p.requires_grad for p in model.parameters())  # frozen only while training


def test_interrupted_run_resumes_to_the_same_router(tmp_path):
    model, data = _train_setup()
    cfg = RouterTrainConfig(num_steps=6, lam=1e-7, lr=0.1, iters=6, batch_size=2, checkpoint_every=2,
                            ste_threshold=0.5)
    whole = train_router(model, data, cfg, checkpoint=tmp_path / "a.safetensors", progress=False)

    def crash(it, loss):
        if it == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_router(model, data, cfg, checkpoint=tmp_path / "b.safetensors", progress=False, on_step=crash)
    assert load_router(tmp_path / "b.safetensors")[1]["iteration"] == 2
    resumed = train_router(model, data, cfg, checkpoint=tmp_path / "b.safetensors", resume=True, progress=False)
    assert resumed.start_iteration == 2
    assert torch.equal(resumed.logits, whole.logits)
    assert resumed.losses == whole.losses
    with pytest.raises(stepcache.ConfigError, match="lam"):
        train_router(model, data, RouterTrainConfig(**{**cfg.__dict__, "lam": 0.5}),
                     checkpoint=tmp_path / "b.safetensors", resume=True, progress=False)


# ------------------------------------------------------------------------------------ report and CLI
def test_report_counts_and_macs(tmp_path):
    logits = synthetic_router(20, 28, 157, 155)
    with torch.device("meta"):
        model = stepcache.DiT.from_preset("DiT-XL/2", input_size=32)
    rep = router_report(logits, 0.1, model)
    assert rep["skipped_units"] == 560 - 312 and rep["attn_skipped"] == 280 - 157
    from stepcache.adapters.dit import dit_macs

    m, T = dit_macs(model), model.num_tokens
    executed = 20 * m["fixed"] + (280 + 157) * m["attn"](T) + (280 + 155) * m["mlp"](T)
    assert rep["macs_executed"] == executed and rep["macs_uncached"] == 20 * (m["fixed"] + 28 * (
        m["attn"](T) + m["mlp"](T)))
    assert 1.2 < rep["ideal_speedup"] < 1.3  # 44% of the units of half the steps
    assert "248/560" in format_table(rep)
    assert heatmap(logits, 0.1, tmp_path / "h.png").stat().st_size > 1000
    none = expected_macs(torch.ones(20, 56, dtype=torch.bool), model)
    assert none["mac_ratio"] == 1.0
    assert model_for_macs({"model": {"config": None}}) is None


def test_cli_train_resume_and_report(tmp_path, capsys):
    from stepcache.cli.main import main

    g = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "lat.npz", latents=torch.randn(6, 4, 32, 32, generator=g).numpy(), labels=np.arange(6))
    common = ["train-router", "--model", "DiT-S/8", "--random-weights", "--data", str(tmp_path / "lat.npz"),
              "--num-steps", "4", "--batch-size", "2", "--lr", "0.1", "--out", str(tmp_path / "r.safetensors"),
              "--no-progress", "--checkpoint-every", "1"]
    assert main(common + ["--iters", "1"]) == 0
    assert main(common + ["--iters", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "trained 1 iterations" in out
    logits, meta = load_router(tmp_path / "r.safetensors")
    assert logits.shape == (4, 24) and meta["model"]["config"]["depth"] == 12 and meta["iters"] == 2
    assert main(["router-report", str(tmp_path / "r.safetensors"), "--out", str(tmp_path / "rep")]) == 0
    assert "expected MACs" in capsys.readouterr().out
    assert (tmp_path / "rep" / "router_heatmap.png").is_file()
    np.savez(tmp_path / "bad.npz", latents=np.zeros((2, 4, 8, 8), np.float32), labels=np.zeros(2, np.int64))
    assert main(common[:5] + [str(tmp_path / "bad.npz"), "--iters", "1"]) == 2
    assert "model expects" in capsys.readouterr().err


def test_data_sources(tmp_path):
    from PIL import Image

    from stepcache.training.l2c_data import load_data

    model = tiny_dit(depth=1, hidden=16, heads=2, input_size=8)
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2])
    torch.save({"latents": x, "labels": y}, tmp_path / "a.pt")
    np.save(tmp_path / "b.npy", x.numpy())
    np.save(tmp_path / "b_labels.npy", y.numpy())
    for name in ("a.pt", "b.npy"):
        data = load_data(str(tmp_path / name), model, latent=True)
        assert torch.equal(data.x0, x) and torch.equal(data.labels, y)
    np.save(tmp_path / "c.npy", x.numpy())
    with pytest.raises(stepcache.CheckpointError, match="c_labels.npy"):
        load_data(str(tmp_path / "c.npy"), model, latent=True)
    for k, cls in enumerate(("cat", "dog")):
        (tmp_path / "img" / cls).mkdir(parents=True)
        Image.fromarray(np.full((20, 12), 60 * k, np.uint8)).save(tmp_path / "img" / cls / "0.png")
    model1 = stepcache.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2,
                           num_classes=2)
    data = load_data(str(tmp_path / "img"), model1, latent=False)
    assert data.x0.shape == (2, 1, 8, 8) and data.labels.tolist() == [0, 1] and data.flip
    assert data.x0[0].eq(-1).all() and torch.allclose(data.x0[1], torch.tensor(60 / 127.5 - 1))
    xb, yb = data.batch(5, torch.Generator().manual_seed(0))
    assert xb.shape == (5, 1, 8, 8) and yb.shape == (5,)
    with pytest.raises(stepcache.ConfigError, match="4 channels"):
        load_data(str(tmp_path / "img"), model, latent=False)
    with pytest.raises(stepcache.ConfigError, match="model expects"):
        load_data(str(tmp_path / "a.pt"), model1, latent=True)


def test_handler_routes_attn_and_mlp_only():
    from stepcache.core.policy import make_handler
    from stepcache.core.context import ModelInfo, SiteKey
    from stepcache.core.context import RunInfo, StepContext

    logits = torch.tensor([[5.0, -5.0, -5.0, 5.0]] * 4)  # layer 0: attn kept, mlp skipped; layer 1 the reverse
    info = ModelInfo(depth=2, num_tokens=4, grid=(2, 2), branches=("attn", "cross", "mlp"))
    handler = make_handler(L2C(logits), info)
    handler.reset(RunInfo(num_steps=4, batch=1))
    kinds = lambda i: [handler.decide(StepContext(i, 4), SiteKey(l, b), None).kind for l in (0, 1)  # noqa: E731
                       for b in ("attn", "cross", "mlp")]
    assert kinds(3) == kinds(1) == ["compute"] * 6
    assert kinds(2) == kinds(0) == ["compute", "compute", "reuse", "reuse", "compute", "compute"]
    with pytest.raises(stepcache.UnsupportedModelError):
        make_handler(L2C(logits), ModelInfo(depth=2, num_tokens=4, grid=(2, 2), branches=("attn1", "ff")))


def test_shipped_router_fits_the_embedded_model():
    from stepcache.models import embedded

    path = embedded.ASSETS / f"embedded_router_ddim{embedded.DEFAULT_STEPS}.safetensors"
    if not path.is_file() or not embedded.WEIGHTS_FILE.is_file():
        pytest.skip("no shipped router or embedded model")
    policy = L2C.from_checkpoint(path)
    _, meta = load_router(path)
    config = embedded.embedded_config()["model"]
    assert policy.num_steps == embedded.DEFAULT_STEPS and policy.depth == config["depth"]
    assert meta["model"]["config"] == config and meta["sampler"] == embedded.DEFAULT_SAMPLER
    assert 0.0 < active_units(policy.logits(), policy.threshold)["skipped_share"] < 1.0
