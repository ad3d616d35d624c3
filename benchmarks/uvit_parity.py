"""Reference parity: stepcache's U-ViT, DPM-Solver++(2S) and L2C against the published L2C U-ViT code.

Needs the ``U-ViT`` folder of horseee/learning-to-cache passed as ``--ref-dir`` (``libs/uvit.py``,
``libs/uvit_dynamic.py``, ``libs/uvit_router.py``, ``dpm_solver_pp.py``, ``ckpt/dpm{20,50}_router.pth``);
it is NOT run in CI and nothing of the reference is shipped. Where ``einops`` is not installed, a
three-pattern stand-in for ``einops.rearrange`` (the only function the reference model uses) is put in
``sys.modules`` first.

For a random U-ViT of H/2 depth (28 + 1 blocks, narrow so it runs on a CPU) with the same weights in
both implementations, the same initial noise and labels, the script runs the reference's sampling
(``NoiseScheduleVP('discrete')`` on Stable Diffusion's betas, ``DPM_Solver(predict_x0=True).sample(...,
order=2, method='singlestep')``, CFG ``cond + 0.4 (cond - uncond)`` in two calls) plain (``libs/uvit.py``)
and with each published router (``libs/uvit_dynamic.py``, ``load_ranking``) at thresholds 0.1 and 0.9,
NFE 20 and 50, against ``stepcache.sample(..., sampler="dpm-solver++2s", cfg_scale=1.4, policy=L2C...)``;
and it counts the routers' active units as the reference's ``load_ranking`` does vs ``active_units``.

    .venv/bin/python benchmarks/uvit_parity.py --ref-dir /tmp/ref-uvit/U-ViT \\
        --out benchmarks/results/uvit_parity.json
    .venv/bin/python benchmarks/uvit_parity.py --ref-dir /tmp/ref-uvit/U-ViT \\
        --dump-fixture tests/fixtures/reference_uvit_small.pt
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- reference
def _rearrange(x: torch.Tensor, pattern: str, **sizes) -> torch.Tensor:
    """The three ``einops.rearrange`` patterns of the reference U-ViT, written out by hand."""
    pattern = " ".join(pattern.split())
    if pattern == "B L (K H D) -> K B H L D":
        B, L, _ = x.shape
        return x.reshape(B, L, sizes["K"], sizes["H"], -1).permute(2, 0, 3, 1, 4)
    if pattern == "B H L D -> B L (H D)":
        B, H, L, D = x.shape
        return x.transpose(1, 2).reshape(B, L, H * D)
    if pattern == "B (h w) (p1 p2 C) -> B C (h p1) (w p2)":
        B, _, _ = x.shape
        h, p = sizes["h"], sizes["p1"]
        x = x.reshape(B, h, x.shape[1] // h, p, p, -1)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, x.shape[-1], h * p, x.shape[2] * p)
    raise NotImplementedError(f"einops stand-in does not know {pattern!r}")


def import_reference(ref_dir) -> types.SimpleNamespace:
    """(uvit, uvit_dynamic, dpm_solver_pp) modules of the reference folder, imported in isolation."""
    root = Path(ref_dir)
    if not (root / "libs" / "uvit_dynamic.py").is_file():
        raise SystemExit(f"{root} is not the U-ViT folder of horseee/learning-to-cache (no libs/uvit_dynamic.py).")
    try:
        importlib.import_module("einops")
    except ImportError:
        sys.modules["einops"] = types.SimpleNamespace(rearrange=_rearrange)
    names = ("libs.uvit", "libs.uvit_dynamic", "libs.uvit_router", "dpm_solver_pp")
    if any(k == "libs" or k.startswith("libs.") for k in sys.modules):
        raise SystemExit("another package named 'libs' is already imported; run this script on its own.")
    sys.path.insert(0, str(root))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the reference prints its attention mode
            mods = {n.split(".")[-1]: importlib.import_module(n) for n in names}
    finally:
        sys.path.remove(str(root))  # the modules stay: load_ranking imports libs.uvit_router lazily
    return types.SimpleNamespace(root=root, **mods)


sys.path.insert(0, str(REPO))  # tests/helpers.py builds the seeded random U-ViT
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402

import stepcache  # noqa: E402
from stepcache.diffusion.discrete_vp import DiscreteVPSchedule, scaled_linear_betas  # noqa: E402
from stepcache.policies.l2c import load_router  # noqa: E402
from stepcache.policies.l2c_dpm import staged_active_units  # noqa: E402
from tests.helpers import tiny_uvit  # noqa: E402


def twin(module, model: stepcache.UViT):
    """The reference U-ViT (``module.UViT``) holding ``model``'s exact weights (strict load: same keys)."""
    c = model.config
    with contextlib.redirect_stdout(io.StringIO()):
        ref = module.UViT(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.embed_dim,
                          depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias,
                          mlp_time_embed=c.mlp_time_embed, num_classes=c.num_classes, conv=c.conv)
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref.eval()


def diffs(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a.double() - b.double()).abs()
    return {"max_abs_diff": float(d.max()), "max_rel_diff": float(d.max() / a.double().abs().max()),
            "bit_identical": bool(torch.equal(a, b)), "max_abs_value": float(a.abs().max())}


def reference_sampling(ref, net, z, y, nfe: int, scale: float, null: int, times: list | None = None):
    """The reference's sample_z: NoiseScheduleVP('discrete') on SD betas, DPM_Solver++ singlestep order 2,
    two network calls per evaluation (cond, then uncond) combined as cond + scale (cond - uncond).
    (The script itself cannot be imported here: it needs accelerate, absl, ml_collections and the VAE.)"""
    schedule = ref.dpm_solver_pp.NoiseScheduleVP(schedule="discrete",
                                                 betas=torch.tensor(scaled_linear_betas()).float())
    n_train = 1000

    def cfg_nnet(x, t):
        if times is not None:
            times.append(float(t[0]))
        cond = net(x, t, y=y)
        uncond = net(x, t, y=torch.tensor([null] * x.size(0)))
        return cond + scale * (cond - uncond)

    solver = ref.dpm_solver_pp.DPM_Solver(lambda x, t: cfg_nnet(x, t * n_train), schedule, predict_x0=True,
                                          thresholding=False)
    return solver.sample(z, steps=nfe, eps=1.0 / n_train, T=1.0, order=2, method="singlestep")


def load_ranking(ref_net, router: Path, nfe: int, thres: float) -> str:
    """The reference's own router set-up (timestep table from float32 linspace, as sample_ldm_discrete)."""
    grid = torch.linspace(1.0, 1.0 / 1000, nfe // 2 + 1).cpu().numpy()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ref_net.load_ranking(str(router), nfe, np.round(grid * 1000), thres)
    return out.getvalue()


def parse_counts(log: str) -> dict:
    """Active / total units from load_ranking's printout."""
    found = {}
    for key, label in (("active", "Layer"), ("attn_active", "Attention"), ("mlp_active", "MLP")):
        line = next(s for s in log.splitlines() if s.startswith(f"Total Activate {label}:"))
        a, b = line.split(":")[1].split(",")[0].strip().split("/")
        found[key], found[key.replace("active", "total")] = int(a), int(b)
    return found


@torch.no_grad()
def compare_schedule(ref) -> dict:
    """Our float32 schedule functions against NoiseScheduleVP('discrete') on the solver's time grids."""
    ours = DiscreteVPSchedule.scaled_linear()
    theirs = ref.dpm_solver_pp.NoiseScheduleVP(schedule="discrete", betas=torch.tensor(scaled_linear_betas()).float())
    t = torch.cat([torch.linspace(1.0, 1e-3, n + 1) for n in (10, 25)] + [torch.rand(200) * 0.999 + 1e-3])
    lam = theirs.marginal_lambda(t)
    return {"log_alpha": diffs(theirs.marginal_log_mean_coeff(t), ours.log_alpha(t)),
            "lambda": diffs(lam, ours.lambda_(t)), "inverse_lambda": diffs(theirs.inverse_lambda(lam),
                                                                          ours.inverse_lambda(lam))}


@torch.no_grad()
def run_case(ref, model, ref_plain, z, y, nfe, router, thres, scale) -> dict:
    """One configuration: the reference's final latents vs stepcache.sample's, and the network times."""
    null = model.null_label
    case = {"nfe": nfe, "router": router.name if router else None, "threshold": thres}
    if router is None:
        net, policy = ref_plain, stepcache.NoCache()
    else:
        net = twin(ref.uvit_dynamic, model)
        case["reference_counts"] = parse_counts(load_ranking(net, router, nfe, thres))
        policy = stepcache.L2C.from_checkpoint(router, threshold=thres)
    times: list = []
    start = time.perf_counter()
    a = reference_sampling(ref, net, z, y, nfe, scale, null, times)
    case["reference_s"] = round(time.perf_counter() - start, 2)
    seen: list = []
    hook = model.register_forward_pre_hook(lambda _m, args: seen.append(float(args[1][0])))
    start = time.perf_counter()
    try:
        b, stats = stepcache.sample(model, z, y, num_steps=nfe // 2, sampler="dpm-solver++2s", cfg_scale=1 + scale,
                                    policy=policy, return_stats=True)
    finally:
        hook.remove()
    case["stepcache_s"] = round(time.perf_counter() - start, 2)
    case.update(diffs(a, b))
    case["network_times_equal"] = times == seen
    case["network_times"] = [round(v, 4) for v in seen]
    case["network_calls"] = {"reference": 2 * len(times), "stepcache": stats.nfe}
    case["mac_ratio"] = stats.mac_ratio
    if router is not None:
        ours = staged_active_units(load_router(router)[0], thres)
        case["stepcache_counts"] = {k: ours[k] for k in ("active", "total", "attn_active", "mlp_active")}
        case["counts_equal"] = all(ours[k] == case["reference_counts"][k] for k in case["stepcache_counts"])
        case["per_step_active"] = list(ours["per_step"].values())
        plain = stepcache.sample(model, z, y, num_steps=nfe // 2, sampler="dpm-solver++2s", cfg_scale=1 + scale)
        case["diff_to_uncached"] = diffs(plain, b)["max_abs_diff"]  # caching must change the output
    return case


@torch.no_grad()
def compare_dit_solver(ref, nfe: int = 20, cfg: float = 1.5) -> dict:
    """DiT under DPM-Solver++(2S): the reference solver on DiT's linear betas, with the standard discrete-time
    input 1000 (t - 1/1000) and DiT's own guidance, vs stepcache.sample(..., sampler="dpm-solver++2s")."""
    from stepcache.diffusion.schedule import linear_betas
    from stepcache.sampling.guidance import guided_forward
    from tests.helpers import tiny_dit

    dit = tiny_dit(depth=4)
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 7])
    schedule = ref.dpm_solver_pp.NoiseScheduleVP(schedule="discrete", betas=torch.tensor(linear_betas()).float())

    def model_fn(x, t):
        t_in = (t - 1.0 / 1000) * 1000.0
        out = guided_forward(dit, torch.cat([x, x]), torch.cat([t_in, t_in]), torch.cat([y, torch.full_like(y, 10)]),
                             cfg_scale=cfg, channels=3)
        return out[: x.shape[0], :4]

    solver = ref.dpm_solver_pp.DPM_Solver(model_fn, schedule, predict_x0=True, thresholding=False)
    a = solver.sample(z, steps=nfe, eps=1e-3, T=1.0, order=2, method="singlestep")
    b = stepcache.sample(dit, z, y, num_steps=nfe // 2, sampler="dpm-solver++2s", cfg_scale=cfg)
    return {"nfe": nfe, "cfg_scale": cfg, **diffs(a, b)}


def unit_table(ref, model, ckpt: Path, thresholds) -> list:
    """The spec's active-unit table: the reference's load_ranking vs staged_active_units."""
    rows = []
    for name, nfe in (("dpm20_router.pth", 20), ("dpm50_router.pth", 50)):
        for thres in thresholds:
            net = twin(ref.uvit_dynamic, model)
            theirs = parse_counts(load_ranking(net, ckpt / name, nfe, thres))
            ours = staged_active_units(load_router(ckpt / name)[0], thres)
            rows.append({"router": name, "threshold": thres, "reference": theirs,
                         "stepcache": {k: ours[k] for k in theirs},
                         "equal": all(ours[k] == v for k, v in theirs.items()),
                         "removed_pct": round(100 * ours["skipped_share"], 2)})
    return rows


FIXTURE_MODEL = dict(depth=4, embed_dim=32, heads=2, img_size=8, num_classes=1001, seed=5)


@torch.no_grad()
def dump_fixture(ref, path: Path, scale: float = 0.4) -> dict:
    """Reference latents of a tiny seeded U-ViT (tests.helpers.tiny_uvit(**FIXTURE_MODEL)): plain DPM-Solver
    NFE 10, and with a synthetic router in the reference's file format (bare {'i.prob': float32[10]})."""
    import collections
    import tempfile

    model = tiny_uvit(**FIXTURE_MODEL)
    g = torch.Generator().manual_seed(6)
    z = torch.randn(2, 4, 8, 8, generator=g)
    y = torch.tensor([3, 997])
    logits = torch.randn(10, 2 * (FIXTURE_MODEL["depth"] + 1), generator=g) * 3  # (2N, 2 * blocks)
    data = {"model": FIXTURE_MODEL, "noise": z, "labels": y, "scale": scale, "nfe": 10, "router": logits,
            "torch": str(torch.__version__)}
    data["plain"] = reference_sampling(ref, twin(ref.uvit, model), z, y, 10, scale, model.null_label).clone()
    with tempfile.TemporaryDirectory() as tmp:
        router = Path(tmp) / "router.pth"
        torch.save(collections.OrderedDict((f"{i}.prob", row.clone()) for i, row in enumerate(logits)), router)
        for thres in (0.1, 0.9):
            net = twin(ref.uvit_dynamic, model)
            load_ranking(net, router, 10, thres)
            data[f"l2c_{thres}"] = reference_sampling(ref, net, z, y, 10, scale, model.null_label).clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return {"fixture": str(path), "bytes": path.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref-dir", type=Path, required=True, help="the U-ViT folder of horseee/learning-to-cache")
    ap.add_argument("--depth", type=int, default=28, help="in + out blocks (28: U-ViT-H/2, 29 blocks with the mid)")
    ap.add_argument("--embed-dim", type=int, default=64, help="width of the random U-ViT")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--img-size", type=int, default=32, help="latent side (32: 256 patches, as ImageNet 256)")
    ap.add_argument("--n", type=int, default=2, help="samples per run")
    ap.add_argument("--scale", type=float, default=0.4, help="the reference's guidance scale (cfg_scale = 1 + scale)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights, noise and labels")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="relative tolerance on final latents")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--dump-fixture", type=Path, default=None, help="only write the golden test fixture here")
    args = ap.parse_args()

    ref = import_reference(args.ref_dir)
    if args.dump_fixture is not None:
        print(json.dumps(dump_fixture(ref, args.dump_fixture)))
        return
    ckpt = ref.root / "ckpt"
    model = tiny_uvit(depth=args.depth, embed_dim=args.embed_dim, heads=args.heads, img_size=args.img_size,
                      num_classes=1001, seed=args.seed)
    ref_plain = twin(ref.uvit, model)
    g = torch.Generator().manual_seed(args.seed + 1)
    z = torch.randn(args.n, 4, args.img_size, args.img_size, generator=g)  # (n, 4, H, W)
    y = torch.randint(0, 1000, (args.n,), generator=g)
    t = torch.tensor([1000.0, 951.84, 11.4, 6.7][: max(args.n, 1)] * args.n)[: args.n]
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": str(torch.__version__),
              "threads": torch.get_num_threads(),
              "model": {"depth": args.depth, "blocks": args.depth + 1, "embed_dim": args.embed_dim,
                        "heads": args.heads, "img_size": args.img_size, "tokens": model.num_tokens},
              "n": args.n, "scale": args.scale, "cfg_scale": 1 + args.scale, "tolerance_rel": args.tolerance,
              "cfg_form": "stepcache: one batched [cond; uncond] call; reference: two calls (cond, uncond)"}
    with torch.no_grad():
        report["forward"] = diffs(ref_plain(z, t, y), model(z, t, y))
    report["schedule"] = compare_schedule(ref)
    report["dit_dpm_solver"] = compare_dit_solver(ref)
    print(json.dumps({"dit_dpm_solver": report["dit_dpm_solver"]}), flush=True)
    cases = [(20, None, None), (50, None, None)]
    cases += [(nfe, ckpt / f"dpm{nfe}_router.pth", thres) for nfe in (20, 50) for thres in (0.1, 0.9)]
    report["sampling"] = []
    for nfe, router, thres in cases:
        case = run_case(ref, model, ref_plain, z, y, nfe, router, thres, args.scale)
        case["within_tolerance"] = case["max_rel_diff"] <= args.tolerance
        report["sampling"].append(case)
        print(json.dumps({k: case[k] for k in ("nfe", "router", "threshold", "max_abs_diff", "max_rel_diff",
                                               "network_times_equal", "reference_s", "stepcache_s")}), flush=True)
    report["units"] = unit_table(ref, model, ckpt, (0.1, 0.5, 0.9))
    report["all_within_tolerance"] = all(c["within_tolerance"] for c in report["sampling"])
    report["all_counts_equal"] = all(r["equal"] for r in report["units"])
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(json.dumps({k: report[k] for k in ("forward", "all_within_tolerance", "all_counts_equal")}, indent=2))


if __name__ == "__main__":
    main()
