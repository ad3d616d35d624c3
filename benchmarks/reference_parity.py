"""Reference parity: stepcache's DiT, samplers, guidance and FORA against the published reference code.

Needs a checkout of the reference DiT code (facebookresearch/DiT: ``models.py`` and the ``diffusion/``
package) passed as ``--ref-dir``; it is NOT run in CI and nothing of the reference is shipped. The
reference imports ``timm``; where timm is not installed, ``--timm-dir`` points to a folder holding a
``timm`` package that provides ``PatchEmbed``, ``Attention`` (fused SDPA) and ``Mlp``. ``--fora-dir``
optionally points to FORA's ``src/`` (prathebaselva/FORA; its cache loop hard-codes 28 blocks).

For one tiny random DiT (zero-initialised layers re-randomised, depth 28 by default), the same weights
are loaded into both implementations, and with the same initial noise and the same global-RNG seed
the script compares: model forwards, ``forward_with_cfg`` vs ``guided_forward``, ``p_sample_loop``
(DDPM-50, DDPM-250) and ``ddim_sample_loop`` (DDIM-50) with CFG 1.5 against ``stepcache.sample``, and
FORA's ``boost_infer_static`` (N=3, DDPM-50) against ``stepcache.sample(..., policy=FORA(3))``.

    .venv/bin/python benchmarks/reference_parity.py --ref-dir /tmp/ref_dit --timm-dir /tmp/ref_dit/fake \\
        --fora-dir /tmp/ref_fora --out benchmarks/results/reference_parity.json \\
        --dump-fixture tests/fixtures/reference_dit_small.pt
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests/helpers.py builds the tiny seeded models

import stepcache  # noqa: E402
from stepcache.sampling.guidance import guided_forward  # noqa: E402
from tests.helpers import tiny_dit  # noqa: E402

FIXTURE_MODEL = dict(depth=2, hidden=32, heads=2, input_size=8, patch=2, num_classes=10, seed=7)


def import_reference(root: Path, timm_dir: Path | None):
    """(models module, diffusion package) of a reference checkout, imported in isolation."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k in ("models", "diffusion")
             or k.startswith("diffusion.")}
    paths = [str(root)] + ([str(timm_dir)] if timm_dir else [])
    sys.path[:0] = paths
    try:
        models, diffusion = importlib.import_module("models"), importlib.import_module("diffusion")
    finally:
        del sys.path[:len(paths)]
        for k in [k for k in sys.modules if k in ("models", "diffusion") or k.startswith("diffusion.")]:
            sys.modules.pop(k)
        sys.modules.update(saved)
    return models, diffusion


def twin(ref_models, model: stepcache.DiT, **extra):
    """The reference DiT with ``model``'s exact weights (strict load: the official key names must match)."""
    c = model.config
    ref = ref_models.DiT(input_size=c.input_size, patch_size=c.patch_size, in_channels=c.in_channels,
                         hidden_size=c.hidden_size, depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
                         class_dropout_prob=c.class_dropout_prob, num_classes=c.num_classes,
                         learn_sigma=c.learn_sigma)
    ref.load_state_dict(model.state_dict(), strict=True)
    for k, v in extra.items():
        setattr(ref, k, v)
    return ref.eval()


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def inputs(model: stepcache.DiT, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    z = torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=g)  # (n, C, H, W)
    y = torch.randint(0, c.num_classes, (n,), generator=g)
    return z, y


def cfg_batch(z, y, null: int):
    return torch.cat([z, z]), torch.cat([y, torch.full_like(y, null)])


def ref_loop(ref_diffusion, fn, z2, y2, cfg, steps: int, sampler: str, rng_seed: int, **loop_kw):
    diffusion = ref_diffusion.create_diffusion(str(steps))
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    torch.manual_seed(rng_seed)
    out = loop(fn, z2.shape, z2, clip_denoised=False, model_kwargs=dict(y=y2, cfg_scale=cfg), device="cpu",
               **loop_kw)
    return out[: z2.shape[0] // 2]


def ours(model, z, y, cfg, steps, sampler, rng_seed, policy=None):
    torch.manual_seed(rng_seed)
    return stepcache.sample(model, z, y, num_steps=steps, sampler=sampler, cfg_scale=cfg, policy=policy)


@torch.no_grad()
def compare_forward(ref, model, seed: int) -> dict:
    z, y = inputs(model, 4, seed)
    t = torch.tensor([0, 250, 500, 999])
    z2, y2 = cfg_batch(z[:2], y[:2], model.num_classes)
    return {"forward": maxdiff(ref(z, t, y), model(z, t, y)),
            "forward_with_cfg": maxdiff(ref.forward_with_cfg(z2, t, y2, 1.5),
                                        guided_forward(model, z2, t, y2, cfg_scale=1.5, channels=3))}


@torch.no_grad()
def compare_sampling(ref, ref_diffusion, model, runs, n: int, cfg: float, seed: int) -> dict:
    z, y = inputs(model, n, seed)
    z2, y2 = cfg_batch(z, y, model.num_classes)
    out = {}
    for sampler, steps in runs:
        a = ref_loop(ref_diffusion, ref.forward_with_cfg, z2, y2, cfg, steps, sampler, seed + 1)
        b = ours(model, z, y, cfg, steps, sampler, seed + 1)
        out[f"{sampler}-{steps}"] = {"max_abs_diff": maxdiff(a, b), "bit_identical": bool(torch.equal(a, b)),
                                     "max_abs_value": float(a.abs().max())}
    return out


@torch.no_grad()
def compare_fora(fora_models, fora_diffusion, model, n, cfg, seed, interval: int, steps: int) -> dict:
    ref = twin(fora_models, model, cache_attn=[], cache_mlp=[], num_steps=steps, cache_threshold=str(interval))
    z, y = inputs(model, n, seed)
    z2, y2 = cfg_batch(z, y, model.num_classes)
    a = ref_loop(fora_diffusion, ref.forward_with_cfg, z2, y2, cfg, steps, "ddpm", seed + 1,
                 save_cache="boost_infer_static", cache_subtype="default")
    b = ours(model, z, y, cfg, steps, "ddpm", seed + 1, policy=stepcache.FORA(interval))
    plain = ours(model, z, y, cfg, steps, "ddpm", seed + 1)
    return {f"fora{interval}-ddpm-{steps}": {"max_abs_diff": maxdiff(a, b), "bit_identical": bool(torch.equal(a, b)),
                                              "diff_to_uncached": maxdiff(b, plain)}}


@torch.no_grad()
def dump_fixture(ref_models, ref_diffusion, path: Path, cfg: float = 1.5) -> dict:
    """Reference DDPM-10 / DDIM-10 latents of a tiny seeded model rebuilt by tests.helpers.tiny_dit."""
    spec = dict(FIXTURE_MODEL)
    model = tiny_dit(**spec)
    ref = twin(ref_models, model)
    z, y = inputs(model, 2, 11)
    z2, y2 = cfg_batch(z, y, model.num_classes)
    data = {"model": spec, "noise": z, "labels": y, "cfg_scale": cfg, "rng_seed": 12, "steps": 10,
            "torch": str(torch.__version__)}
    for sampler in ("ddpm", "ddim"):
        data[sampler] = ref_loop(ref_diffusion, ref.forward_with_cfg, z2, y2, cfg, 10, sampler, 12).clone()
    # without guidance the reference loop runs the plain model on the n conditional rows
    diffusion = ref_diffusion.create_diffusion("10")
    torch.manual_seed(12)
    data["ddpm_nocfg"] = diffusion.p_sample_loop(ref, z.shape, z, clip_denoised=False, model_kwargs=dict(y=y),
                                                 device="cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return {"fixture": str(path), "bytes": path.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref-dir", type=Path, required=True,
                    help="checkout of facebookresearch/DiT (models.py, diffusion/)")
    ap.add_argument("--timm-dir", type=Path, default=None, help="folder with a timm package, if timm is not installed")
    ap.add_argument("--fora-dir", type=Path, default=None, help="FORA's src/ folder (optional)")
    ap.add_argument("--depth", type=int, default=28, help="blocks of the tiny model (FORA's loop needs 28)")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny model")
    ap.add_argument("--heads", type=int, default=4, help="attention heads of the tiny model")
    ap.add_argument("--input-size", type=int, default=8, help="latent side of the tiny model")
    ap.add_argument("--n", type=int, default=2, help="conditional samples per run")
    ap.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights, noise and the global RNG")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--dump-fixture", type=Path, default=None, help="write the golden-latents test fixture here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    ref_models, ref_diffusion = import_reference(args.ref_dir, args.timm_dir)
    model = tiny_dit(depth=args.depth, hidden=args.hidden, heads=args.heads, input_size=args.input_size,
                     seed=args.seed)
    ref = twin(ref_models, model)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": str(torch.__version__),
              "model": {"depth": args.depth, "hidden": args.hidden, "heads": args.heads,
                        "input_size": args.input_size}, "n": args.n, "cfg_scale": args.cfg_scale}
    report["forward"] = compare_forward(ref, model, args.seed)
    runs = [("ddpm", 50), ("ddpm", 250), ("ddim", 50)]
    report["sampling"] = compare_sampling(ref, ref_diffusion, model, runs, args.n, args.cfg_scale, args.seed)
    if args.fora_dir is not None:
        fora_models, fora_diffusion = import_reference(args.fora_dir, args.timm_dir)
        report["fora"] = {}
        for steps in (50, 250):
            report["fora"].update(compare_fora(fora_models, fora_diffusion, model, args.n, args.cfg_scale,
                                               args.seed, 3, steps))
    if args.dump_fixture is not None:
        report["fixture"] = dump_fixture(ref_models, ref_diffusion, args.dump_fixture, args.cfg_scale)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
