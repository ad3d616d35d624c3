"""Reference parity on OpenSora v1.2: stepcache's STDiT3, rectified-flow sampler and ToCa's video variant
against the ToCa repository's Open-Sora code, run itself on the CPU.

Needs the ``Open-Sora`` folder of Shenyi-Z/ToCa passed as ``--ref-dir`` (nothing of it is shipped; GPU-only
imports are stubbed by ``benchmarks/opensora_ref.py``) and ``einops``, ``rotary_embedding_torch`` 0.5.3 and
``beartype`` importable (``--deps-dir``: a ``pip install --target`` folder). A small random STDiT3 (depth 28:
the real interleaved block structure; few channels, a few frames) gets the same weights in both, the same
noise, T5 features and mask, and the 240p 9:16 51-frame size arguments; the final latents of 10- and 30-step
runs are compared, uncached and with ToCa. The reference's "uncached" run is its own code with every module
forced fresh (its ``global_force_fresh`` answering True for every module; the released code always caches).

    PYTHONPATH=src .venv/bin/python benchmarks/opensora_parity.py --ref-dir /tmp/ref-opensora/Open-Sora \\
        --deps-dir /tmp/refdeps --out benchmarks/results/opensora_parity.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # tests/stdit3_helpers.py builds the seeded model

import stepcache  # noqa: E402
from stepcache.models.stdit3 import STDiT3  # noqa: E402
from tests.stdit3_helpers import tiny_stdit3, video_inputs  # noqa: E402

SMALL = dict(depth=28, hidden_size=32, num_heads=2, caption_channels=32, model_max_length=12)
LATENT = (4, 5, 8, 10)  # (C, T, H, W): 5 frames of 4 x 5 patches, N = 100 tokens per row
SIZES = dict(height=240.0, width=426.0, num_frames=51.0, fps=24.0)  # 240p 9:16, 51 frames
# Non-default options checked at 10 steps, batch 1: (name, ToCa kwargs, reference cache arguments).
OPTIONS = [
    ("constant-schedule", dict(schedule="constant"), dict(ratio_scheduler="constant")),  # cross cuts k > 0
    ("linear-similarity", dict(schedule="linear", score="similarity"),
     dict(ratio_scheduler="linear", cache_type="similarity")),
    ("exp-norm", dict(schedule="exp", score="norm"), dict(ratio_scheduler="exp", cache_type="norm")),
    ("layerwise-straight", dict(schedule="layerwise", score="straight"),
     dict(ratio_scheduler="layerwise", cache_type="straight")),
    ("linear-mode-random", dict(schedule="linear-mode", score="random", fresh_ratio=0.3),
     dict(ratio_scheduler="linear-mode", cache_type="random", fresh_ratio=0.3)),
    ("fora", dict(fresh_ratio=0.0), dict(fresh_ratio=0.0)),
]
TOCA_ARGS = dict(cache_type="attention", ratio_scheduler="ToCa", fresh_ratio=0.1, fresh_threshold=3,
                 force_fresh="global", soft_fresh_weight=0.25)


def small_model(seed: int = 0) -> STDiT3:
    return tiny_stdit3(seed, **SMALL)


def reference_twin(ref, model: STDiT3):
    c = model.config
    cfg = ref.stdit3.STDiT3Config(depth=c["depth"], hidden_size=c["hidden_size"], num_heads=c["num_heads"],
                                  caption_channels=c["caption_channels"], model_max_length=c["model_max_length"],
                                  qk_norm=c["qk_norm"])
    twin = ref.stdit3.STDiT3(cfg)
    twin.load_state_dict(model.state_dict(), strict=True)  # the official key names must match
    return twin.eval()


class _TextStub:
    """Stands in for the reference's T5 wrapper: the precomputed features, and ``null`` = the model's learned
    null caption (what the real wrapper returns)."""

    def __init__(self, y, mask, model):
        self.y, self.mask, self.model = y, mask, model

    def encode(self, prompts):
        return dict(y=self.y, mask=self.mask)

    def null(self, n):
        return self.model.y_embedder.y_embedding[None].repeat(n, 1, 1)[:, None]


class _Recorder:
    """Wraps the reference's ``global_force_fresh`` and ``cache_cutfresh`` (in its stdit3 module) to record
    which modules ran full at each step, how many tokens each cut recomputed, and the score gap at each top-k
    boundary (recomputed with the reference's own ``score_evaluate`` before the cut; deterministic scores)."""

    def __init__(self, ref):
        self.ref, self.full, self.cuts, self.gaps = ref, {}, {}, []
        self.score_evaluate = ref.cache.score_evaluate

    def force_fresh(self, original):
        def wrapped(cache_dic, current):
            flags = original(cache_dic, current)
            kind = "temporal" if current["flag"] == -1 else "spatial"
            for module, full in flags.items():
                self.full.setdefault((kind, module), set()).update([current["step"]] if full else [])
            return flags

        return wrapped

    def cutfresh(self, original):
        def wrapped(cache_dic, tokens, current):
            share = self.ref.cache.fresh_ratio_scheduler(cache_dic, current)
            k = int(torch.clamp(torch.tensor(share), min=0, max=1) * tokens.shape[1])
            if cache_dic["cache_type"] != "random" and 0 < k < tokens.shape[1]:
                ordered = self.score_evaluate(cache_dic, tokens, current).sort(dim=-1, descending=True)[0]
                self.gaps.append(float((ordered[:, k - 1] - ordered[:, k]).min()))
            index, fresh = original(cache_dic, tokens, current)
            self.cuts.setdefault(current["module"], {}).setdefault(current["step"], set()).add(index.shape[1])
            return index, fresh

        return wrapped


def run_reference(ref, twin, z, y, mask, steps: int, cached: bool, recorder: _Recorder | None = None,
                  options: dict | None = None):
    n = z.shape[0]
    args = {k: torch.tensor([v] * n) for k, v in SIZES.items()}
    args.update(TOCA_ARGS)
    args.update(options or {})
    sampler = ref.rf.RFLOW(num_sampling_steps=steps, cfg_scale=7.0, use_timestep_transform=True)
    module = ref.stdit3
    saved = module.global_force_fresh, module.cache_cutfresh
    if not cached:
        module.global_force_fresh = lambda cache_dic, current: {"attn": True, "cross-attn": True, "mlp": True}
    elif recorder is not None:
        module.global_force_fresh = recorder.force_fresh(saved[0])
        module.cache_cutfresh = recorder.cutfresh(saved[1])
    try:
        with torch.no_grad():
            return sampler.sample(twin, _TextStub(y, mask, twin), z.clone(), ["p"] * n, "cpu",
                                  additional_args=args, progress=False)
    finally:
        module.global_force_fresh, module.cache_cutfresh = saved


def reference_report(rec: _Recorder) -> dict:
    """The reference's full-step lists (per block kind and module) and per-step cut sizes."""
    names = {"attn": "attn", "cross-attn": "cross", "mlp": "mlp"}
    out = {f"full_steps_{kind}_{names[m]}": sorted(steps) for (kind, m), steps in rec.full.items()}
    for module, per_step in rec.cuts.items():
        out[f"cut_tokens_{names[module]}"] = {s: sorted(v) for s, v in sorted(per_step.items())}
    out["min_topk_gap"] = min(rec.gaps) if rec.gaps else None
    out["topk_cuts_checked"] = len(rec.gaps)
    return out


def run_ours(model, z, y, mask, steps: int, policy=None):
    n = z.shape[0]
    sizes = {k: torch.tensor([v] * n) for k, v in SIZES.items()}
    return stepcache.sample(model, z.clone(), y, num_steps=steps, sampler="rflow", cfg_scale=7.0, policy=policy,
                            mask=mask, return_stats=True, **sizes)


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a.double() - b.double()).abs().max().item()
    scale = a.double().abs().max().item()
    return {"max_abs_diff": d, "max_rel_diff": d / scale, "max_abs_value": scale,
            "bit_identical": bool(torch.equal(a, b))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref-dir", type=Path, required=True)
    parser.add_argument("--deps-dir", type=Path, default=None)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--toca", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--options", action=argparse.BooleanOptionalAction, default=True,
                        help="also check the non-default ToCa options at 10 steps")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dump-fixture", type=Path, default=None,
                        help="save the reference's final latents of the tiny test model (tests/test_stdit3.py)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import opensora_ref

    ref = opensora_ref.load(args.ref_dir, args.deps_dir)
    model = small_model(args.seed)
    twin = reference_twin(ref, model)
    results = {"model": {**SMALL, "latent": LATENT, **SIZES}, "runs": {}}
    for n in args.batch:
        z, y, mask = video_inputs(model, n, LATENT, args.seed + 10 + n, text_len=7)
        for steps in args.steps:
            modes = [("uncached", None)] + ([("toca", stepcache.ToCa())] if args.toca else [])
            for name, policy in modes:
                t0 = time.perf_counter()
                rec = _Recorder(ref) if policy is not None else None
                a = run_reference(ref, twin, z, y, mask, steps, cached=policy is not None, recorder=rec)
                t1 = time.perf_counter()
                b, stats = run_ours(model, z, y, mask, steps, policy)
                t2 = time.perf_counter()
                row = {**diff(a, b), "seconds_reference": t1 - t0, "seconds_stepcache": t2 - t1}
                if policy is not None:
                    row["stats"] = policy_report(stats, steps)
                    row["reference"] = reference_report(rec)
                    row["same_decisions"] = same_decisions(row["stats"], row["reference"], steps)
                key = f"{name}-{steps}-batch{n}"
                results["runs"][key] = row
                print(key, {k: v for k, v in row.items() if k not in ("stats", "reference")}, flush=True)
    if args.dump_fixture:
        dump_fixture(ref, args.dump_fixture)
    if args.options:
        z, y, mask = video_inputs(model, 1, LATENT, args.seed + 11, text_len=7)
        for name, ours_kw, ref_kw in OPTIONS:
            torch.manual_seed(args.seed + 99)  # the random score draws from the global RNG in both
            a = run_reference(ref, twin, z, y, mask, 10, cached=True, options=ref_kw)
            torch.manual_seed(args.seed + 99)
            b, stats = run_ours(model, z, y, mask, 10, stepcache.ToCa(**ours_kw))
            row = {**diff(a, b), "ideal_speedup": stats.ideal_speedup}
            results["runs"][f"toca-{name}-10-batch1"] = row
            print(f"toca-{name}-10-batch1", row, flush=True)
    results["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["torch"] = torch.__version__
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    worst = max(r["max_rel_diff"] for r in results["runs"].values())
    print(f"worst relative difference {worst:.3g}")
    return 0 if worst <= 1e-4 else 1


def dump_fixture(ref, path: Path, steps: int = 10) -> None:
    """Reference outputs of the tiny seeded model of tests/stdit3_helpers.py (seed 0, one sample)."""
    model = tiny_stdit3(0)
    twin = reference_twin(ref, model)
    z, y, mask = video_inputs(model, 1)
    fixture = {"steps": steps, "sizes": SIZES, "latent": tuple(z.shape[1:]),
               "uncached": run_reference(ref, twin, z, y, mask, steps, cached=False),
               "toca": run_reference(ref, twin, z, y, mask, steps, cached=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, path)
    print(f"fixture written to {path}")


def same_decisions(ours: dict, ref: dict, steps: int) -> bool:
    """Our full-step lists and MLP token counts against the reference's (both block kinds)."""
    for branch in ("attn", "cross", "mlp"):
        for kind in ("spatial", "temporal"):
            if ours[f"full_steps_{branch}"] != ref[f"full_steps_{kind}_{branch}"]:
                return False
    cuts = {s: v for s, v in ref.get("cut_tokens_mlp", {}).items()}
    partial = {s: v for s, v in ours["mlp_tokens_per_step"].items() if s not in ours["full_steps_mlp"]}
    return cuts == partial


def policy_report(stats, steps: int) -> dict:
    """Full-step lists per module kind and the per-step token counts of the MLP (counting steps up)."""
    out = {"ideal_speedup": stats.ideal_speedup}
    for branch in ("attn", "cross", "mlp"):
        out[f"full_steps_{branch}"] = sorted(steps - 1 - i for i in stats.full_steps(branch))
    mlp = stats.layer_tokens("mlp")
    out["mlp_tokens_per_step"] = {steps - 1 - i: sorted(set(v)) for i, v in mlp.items()}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
