"""stepcache vs diffusers' own cache hooks vs cache-dit on a PixArt-style transformer, one run, one CPU.

Model: ``PixArtTransformer2DModel`` with PixArt-alpha's depth (28 blocks) and token count (256 =
16x16 patches of a 32x32 latent) at reduced width, random weights with the zero-initialised layers
re-randomised; ``PixArtAlphaPipeline`` with DPM-Solver++ and CFG 4.5 (2 rows), prompt embeddings
passed directly. Every method is measured the same way:

- block work: forward hooks on the projections that only run when a branch really runs (``to_q`` of
  self/cross attention, ``to_k`` of the cross attention, the first linear of the MLP) count the
  tokens each processes; work = tokens x MACs per token (attention: + 2 T d per query). The
  fraction is executed / uncached block work over the whole run.
- ideal speedup: (block + fixed work) uncached / executed, fixed = embeddings, adaLN, final layer.
- measured speedup: the median over ``--repeats`` rounds of (no-cache time / method time) within the
  round; in every round each method is installed, timed on one pipeline call and removed in turn
  (after a first pass that warmed up and measured every method), so a drift of the machine's speed
  hits all methods alike. The ratio of the fastest times is recorded too.
- fidelity to the uncached latents (max abs and PSNR); quality comparisons wait for trained weights.

Methods: stepcache FORA(2), FORA(3), ToCa's PixArt variant (entropy and kv-norm scores); diffusers
FirstBlockCache, TaylorSeer and PyramidAttentionBroadcast applied with their ``apply_*`` functions
(``PixArtTransformer2DModel`` has no ``enable_cache``); cache-dit DBCache (``pip install cache-dit
--no-deps``) when importable. A method that cannot run is recorded with the reason.

Usage: ``python benchmarks/bench_diffusers.py`` (full) or ``--quick`` (short run on a loaded machine).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import stepcache  # noqa: E402
from stepcache import FORA, ToCa  # noqa: E402
from stepcache.adapters.diffusers.common import linear_macs  # noqa: E402
from stepcache.adapters.diffusers.pixart import PixArtAdapter  # noqa: E402
from stepcache.sampling.precision import synchronize  # noqa: E402
from helpers import randomize  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=28, help="transformer blocks (default: %(default)s)")
    p.add_argument("--latent", type=int, default=32, help="latent side; 256 tokens at patch 2 (default: %(default)s)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default: %(default)s)")
    p.add_argument("--head-dim", type=int, default=32, help="channels per head (default: %(default)s)")
    p.add_argument("--text-len", type=int, default=120, help="T5 tokens, PixArt-alpha's 120 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads, 0 = torch's default (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="short run: width 128, 10 steps, 1 repeat, 1 thread")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/diffusers.json",
                   help="JSON results file (default: %(default)s)")
    args = p.parse_args()
    if args.quick:
        args.heads, args.head_dim, args.steps, args.repeats = 4, 32, 10, 1
    return args


# ------------------------------------------------------------------------------ model and pipeline
def build(args):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    inner = args.heads * args.head_dim
    tr = PixArtTransformer2DModel(num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=4,
                                  out_channels=8, num_layers=args.depth, cross_attention_dim=inner, caption_channels=64,
                                  sample_size=args.latent, patch_size=2, norm_type="ada_norm_single",
                                  use_additional_conditions=False, norm_elementwise_affine=False, norm_eps=1e-6)
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=randomize(tr).eval(),
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    inputs = dict(prompt=None, negative_prompt=None, prompt_embeds=torch.randn(1, args.text_len, 64, generator=g),
                  prompt_attention_mask=torch.ones(1, args.text_len),
                  negative_prompt_embeds=torch.randn(1, args.text_len, 64, generator=g),
                  negative_prompt_attention_mask=torch.ones(1, args.text_len),
                  latents=torch.randn(1, 4, args.latent, args.latent, generator=g), height=8 * args.latent,
                  width=8 * args.latent, num_inference_steps=args.steps, guidance_scale=4.5, output_type="latent",
                  use_resolution_binning=False)
    return pipe, inputs


class WorkMeter:
    """Counts block work (MACs) from hooks on projections that run only when their branch runs."""

    def __init__(self, tr, tokens: int, text_len: int):
        self.work, self.handles = 0, []
        for block in tr.transformer_blocks:
            a1, a2, ff = block.attn1, block.attn2, block.ff
            self._count(a1.to_q, linear_macs(a1) + 2 * tokens * a1.inner_dim)
            self._count(a2.to_q, a2.to_q.in_features * a2.to_q.out_features + linear_macs(a2.to_out)
                        + 2 * text_len * a2.inner_dim)
            self._count(a2.to_k, a2.to_k.in_features * a2.to_k.out_features * 2)  # keys and values, per text token
            self._count(next(m for m in ff.modules() if isinstance(m, nn.Linear)), linear_macs(ff))
        self.fixed_per = PixArtAdapter()._fixed_macs(tr)

    def _count(self, module, per_token: int) -> None:
        def hook(_m, inputs, _out):
            x = inputs[0]
            self.work += x.shape[0] * x.shape[1] * per_token

        self.handles.append(module.register_forward_hook(hook))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------ methods
def timestep_tracker(tr):
    """PAB asks for the current timestep: read it from the transformer's input."""
    state = {"t": 1000}

    def pre(_m, args, kwargs):
        t = kwargs.get("timestep")
        state["t"] = int(t.reshape(-1)[0]) if t is not None else state["t"]

    handle = tr.register_forward_pre_hook(pre, with_kwargs=True)
    return state, handle


def methods(pipe):
    """name -> (install() -> remove callable, or a reason string when unavailable)."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context
    from diffusers.hooks import (FirstBlockCacheConfig, HookRegistry, PyramidAttentionBroadcastConfig,
                                 TaylorSeerCacheConfig, apply_first_block_cache, apply_pyramid_attention_broadcast,
                                 apply_taylorseer_cache)

    tr = pipe.transformer

    def stepcache_method(policy):
        def install():
            handle = stepcache.apply(pipe, policy)
            return handle.remove, handle, None

        return install

    def diffusers_method(apply_fn, config, names):
        """PixArt's pipeline sets no cache context and resets no hook state: the benchmark does both
        (one context: PixArt batches cond and uncond in one call)."""

        def install():
            apply_fn(tr, config)
            registry = HookRegistry.check_if_exists_or_initialize(tr)
            registry.invalidate_child_registries_cache()  # hooks were added below the transformer
            context = tr.register_forward_pre_hook(lambda *_: _set_cache_context(tr, CacheContext("cond_uncond")))

            def remove():
                context.remove()
                for name in names:
                    registry.remove_hook(name, recurse=True)
                registry.invalidate_child_registries_cache()
            return remove, None, lambda: registry.reset_stateful_hooks(recurse=True)

        return install

    out = {"none": lambda: ((lambda: None), None, None),
           "stepcache FORA(2)": stepcache_method(FORA(2)), "stepcache FORA(3)": stepcache_method(FORA(3))}
    # ToCa's PixArt variant with the reference's settings (cross-attention entropy, R 0.30, ToCa-pixart)
    out["stepcache ToCa(N=3, PixArt, entropy)"] = stepcache_method(ToCa(interval=3))
    out["stepcache ToCa(N=3, PixArt, kv-norm)"] = stepcache_method(ToCa(interval=3, score="kv-norm"))
    out["diffusers FirstBlockCache(0.05)"] = diffusers_method(
        apply_first_block_cache, FirstBlockCacheConfig(threshold=0.05), ["fbc_leader_block_hook", "fbc_block_hook"])
    out["diffusers TaylorSeer(interval 3, order 1)"] = diffusers_method(
        apply_taylorseer_cache, TaylorSeerCacheConfig(  # its default patterns only match modules named "attn"
            cache_interval=3, disable_cache_before_step=2, max_order=1, taylor_factors_dtype=torch.float32,
            cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|attn2|ff)"]),
        ["taylorseer_cache"])
    state, _ = timestep_tracker(tr)
    out["diffusers PAB(self 2, cross 4)"] = diffusers_method(
        apply_pyramid_attention_broadcast,
        PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, cross_attention_block_skip_range=4,
                                        spatial_attention_timestep_skip_range=(100, 800),
                                        cross_attention_timestep_skip_range=(100, 800),
                                        current_timestep_callback=lambda: state["t"]),
        ["pyramid_attention_broadcast"])
    out["cache-dit DBCache(F1B0, 0.08)"] = cache_dit_method(pipe)
    return out


def cache_dit_method(pipe):
    try:
        import cache_dit
    except Exception as e:  # noqa: BLE001 - any import failure is reported, not fatal
        return f"cache-dit not importable: {type(e).__name__}: {e}"

    def install():
        cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.08, max_warmup_steps=2))
        return (lambda: cache_dit.disable_cache(pipe)), None, None

    return install


# ------------------------------------------------------------------------------ measurement
def first_pass(install, pipe, inputs, meter, base):
    """Install, warm up, measure block work and the output of one call, remove."""
    remove, handle, reset = install()
    reset = reset or (lambda: None)
    try:
        reset()
        pipe(**inputs)  # warm-up
        meter.work = 0
        reset()
        out = pipe(**inputs).images
        work = meter.work
        stats = handle.stats().as_dict() if handle is not None else None
    finally:
        remove()
    rec = {"block_work": work, "times_s": []}
    if base is not None:
        err = (out - base).double()
        mse = float(err.pow(2).mean())
        rec["max_abs_diff"] = float(err.abs().max())
        rec["psnr_db_vs_uncached"] = (10 * math.log10(float(base.double().abs().max()) ** 2 / mse)
                                      if mse > 0 else float("inf"))
    if stats is not None:
        rec["stepcache_ideal_speedup"] = stats["ideal_speedup"]
    return rec, out


def timed_call(install, pipe, inputs) -> float:
    """Install, time one pipeline call, remove."""
    remove, _, reset = install()
    try:
        (reset or (lambda: None))()
        synchronize(pipe.transformer.device)
        t0 = time.perf_counter()
        pipe(**inputs)
        synchronize(pipe.transformer.device)
        return time.perf_counter() - t0
    finally:
        remove()


def speedups(results: dict) -> None:
    """measured_speedup: median over the rounds of (no-cache time / method time) in the same round;
    also the ratio of the fastest times (``measured_speedup_min``) and the median time per method."""
    ref = results["none"]["times_s"]
    for rec in results.values():
        if not rec.get("times_s"):
            continue
        t = rec["times_s"]
        rec["median_s"] = statistics.median(t)
        rec["measured_speedup"] = statistics.median(a / b for a, b in zip(ref, t))
        rec["measured_speedup_min"] = min(ref) / min(t)
        rec["measured_over_ideal"] = rec["measured_speedup"] / rec["ideal_speedup"]


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.quick:
        torch.set_num_threads(1)  # a loaded shared machine: one thread is steadier
    import diffusers

    pipe, inputs = build(args)
    tokens = (args.latent // 2) ** 2
    meter = WorkMeter(pipe.transformer, tokens, args.text_len)
    fixed = 2 * args.steps * (meter.fixed_per[0] * tokens + meter.fixed_per[1] * args.text_len + meter.fixed_per[2])
    results, base, ok = {}, None, {}
    for name, install in methods(pipe).items():  # work and fidelity, one method after the other
        if isinstance(install, str):
            results[name] = {"skipped": install}
            print(f"{name:42s} skipped: {install}", flush=True)
            continue
        try:
            rec, out = first_pass(install, pipe, inputs, meter, base)
        except Exception as e:  # noqa: BLE001 - one failing competitor must not lose the others' numbers
            results[name] = {"skipped": f"{type(e).__name__}: {e}"}
            print(f"{name:42s} failed: {type(e).__name__}: {e}", flush=True)
            continue
        if base is None:
            base = out
        results[name], ok[name] = rec, install
        print(f"{name:42s} work measured", flush=True)
    # timing: the methods take turns in every round, so a drift of the machine's speed hits all alike
    for r in range(args.repeats):
        for name, install in ok.items():
            results[name]["times_s"].append(timed_call(install, pipe, inputs))
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n.split(' ', 1)[-1]} {results[n]['times_s'][-1]:.2f}s"
                                                          for n in ok), flush=True)
    ref = results["none"]
    for name in ok:
        rec = results[name]
        rec["block_work_fraction"] = rec["block_work"] / ref["block_work"]
        rec["ideal_speedup"] = (ref["block_work"] + fixed) / (rec["block_work"] + fixed)
    speedups(results)
    for name in ok:
        rec = results[name]
        print(f"{name:42s} work {rec['block_work_fraction']:.3f}  ideal {rec['ideal_speedup']:.2f}x  "
              f"measured {rec['measured_speedup']:.2f}x  ratio {rec['measured_over_ideal']:.2f}  "
              f"{rec['median_s']:.2f}s  max|diff| {rec.get('max_abs_diff', 0):.2e}", flush=True)
    meter.close()
    record = {
        "benchmark": "bench_diffusers",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python " + " ".join(sys.argv),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"class": "PixArtTransformer2DModel", "depth": args.depth, "tokens": tokens,
                  "width": args.heads * args.head_dim, "text_tokens": args.text_len, "cfg_rows": 2,
                  "weights": "random, zero-initialised layers re-randomised"},
        "environment": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                        "python": platform.python_version(),
                        "machine": platform.machine(), "processor": platform.processor(),
                        "threads": torch.get_num_threads(), "cache_dit": _version("cache-dit")},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
