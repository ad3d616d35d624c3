"""GPU check: every caching method on DiT-XL/2 geometry in bf16, measured vs ideal speedup and peak memory.

What runs (issue 12's GPU check; ``benchmarks/gpu_check.sh`` is the one command, about 8 minutes on one
H100/H200 at most, or seconds with ``--tiny`` on a CPU):

- native: stepcache's DiT with DiT-XL/2 geometry (28 blocks, width 1152, 256 tokens), random weights with
  the zero-initialised adaLN and output layers re-randomised, cast to ``--dtype`` (bf16); DDIM-50, a batch
  of 8 labels with CFG 4.0 (16 rows). Policies: uncached, FORA(3), ToCa, L2C (a synthetic router, see
  ``synthetic_l2c``), TaylorSeer, Forecast, FBCache, DBCache (threshold 0.9: see ``DYNAMIC_THRESHOLD``). Eager,
  then compiled (``stepcache.compile_blocks``: every block's modulation, attention and MLP compiled in place,
  the cache logic staying eager) when ``torch.compile`` works here; a failure is recorded and the section
  skipped.
- peers: diffusers' ``DiTTransformer2DModel`` of the same geometry in a ``DiTPipeline`` (a one-block stub
  VAE; the latents are compared), the native weights converted with ``stepcache.models.convert`` when this
  build has it (else the section is skipped, saying so): stepcache FORA(3) / FBCache / TaylorSeer and
  diffusers' FirstBlockCache and TaylorSeer hooks on the same model in the same run. Block work there is
  counted the same way for everyone: tokens through each block's feed-forward, executed / uncached.

Timings: one warm-up run of every method (compilation happens there), then ``--repeats`` rounds in which
every method of a section runs once in turn; measured speedup = the median over rounds of (uncached time /
method time) of the same round; every reading is taken after ``torch.cuda.synchronize``. Ideal speedup:
stepcache's executed vs uncached MACs (native), or 1 / block-work share (peers). Peak memory: CUDA's
``max_memory_allocated`` over the method's timed runs (None on a CPU). PSNR of the latents vs the
uncached run of the same section.

Writes ``<out-dir>/gpu_check.json`` and ``<out-dir>/gpu_check.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import stepcache  # noqa: E402
from stepcache.bench.methods import build_policy  # noqa: E402
from stepcache.bench.records import environment  # noqa: E402
from stepcache.cli.common import DTYPES, randomize_, resolve_device  # noqa: E402
from stepcache.sampling.precision import synchronize  # noqa: E402

# Random weights have no step-to-step coherence: block 0's residual moves 0.75-1.03 (relative L1) between steps
# of DiT-XL/2 geometry (measured on the CPU in bf16, DDIM-50), so the usual thresholds (0.05-0.2) never skip and
# the dynamic caches would time as uncached. At 0.9 about half of the steps skip (FBCache 23 of 50, DBCache
# F1B0 22 of 50 on the CPU): the check times their machinery, not their quality, for stepcache and the peers alike.
DYNAMIC_THRESHOLD = 0.9
NATIVE_SPECS = ("none", "fora:interval=3", "toca:interval=3,fresh_ratio=0.1", "l2c",
                "taylorseer:interval=3,order=1", "forecast", f"fbcache:threshold={DYNAMIC_THRESHOLD}",
                f"dbcache:front=1,threshold={DYNAMIC_THRESHOLD},warmup=4")
LABELS = (207, 360, 387, 974, 88, 979, 417, 279)  # DiT's sample.py


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a 4-block width-64 DiT, 2 labels, 6 steps: seconds on a CPU")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 50; 6 with --tiny)")
    p.add_argument("--batch", type=int, default=None, help="labels, x2 rows with CFG (default: 8; 2 with --tiny)")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default: %(default)s)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="compiled section: auto = on CUDA only (default: %(default)s)")
    p.add_argument("--peers", choices=("auto", "off"), default="auto", help="diffusers section (default: auto)")
    p.add_argument("--specs", nargs="+", default=list(NATIVE_SPECS), help="native policies ('none' is added)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="sections starting after this many seconds are skipped (default: %(default)s)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check")
    args = p.parse_args(argv)
    args.steps = args.steps or (6 if args.tiny else 50)
    args.batch = args.batch or (2 if args.tiny else 8)
    if "none" not in args.specs:
        args.specs = ["none", *args.specs]
    return args


# ------------------------------------------------------------------------------------------- models
def native_model(args, device, dtype) -> stepcache.DiT:
    if args.tiny:
        model = stepcache.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4)
    else:
        model = stepcache.DiT.from_preset("DiT-XL/2", input_size=32)
    randomize_(model, 0)
    return model.eval().to(device=device, dtype=dtype)


def inputs(model, args, device):
    """Noise (n, C, H, W) float32 drawn on the CPU and labels (n,), on ``device``."""
    c = model.config
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(args.batch, c.in_channels, c.input_size, c.input_size, generator=gen)
    labels = torch.tensor([LABELS[k % len(LABELS)] for k in range(args.batch)])
    return noise.to(device), labels.to(device)


def compile_blocks(model) -> None:
    """Regional compilation, the supported path (``stepcache.compile_blocks``): each block's branch work
    (adaLN modulation, attention, MLP) compiled in place, one graph shared by all blocks; the cache
    decisions stay in Python, so every policy runs unchanged and nothing recompiles from step to step."""
    stepcache.compile_blocks(model)


# ------------------------------------------------------------------------------------------- timing
def peak_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def psnr_db(a: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float((a.double() - ref.double()).pow(2).mean())
    peak = float(ref.double().abs().max()) or 1.0
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


def rounds(methods: dict, run, repeats: int, device) -> dict:
    """Warm-up of every method, then ``repeats`` interleaved rounds. ``run(method) -> (output, info)``."""
    rec, skipped = {}, {}
    for name, method in methods.items():
        try:
            out, info = run(method)  # warm-up (and compilation)
        except Exception as exc:  # noqa: BLE001 - a method that cannot run here is reported, not fatal
            if name == "none":
                raise
            skipped[name] = {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
            continue
        rec[name] = {"times_s": [], **info}
    methods = {k: v for k, v in methods.items() if k in rec}
    ref = None
    for _ in range(repeats):
        for name, method in methods.items():
            peak_reset(device)
            synchronize(device)
            t0 = time.perf_counter()
            out, info = run(method)
            synchronize(device)
            rec[name]["times_s"].append(time.perf_counter() - t0)
            rec[name].update(info, peak_mib=peak_mib(device))
            if name == "none":
                ref = out
            rec[name]["psnr_db_vs_uncached"] = psnr_db(out.float().cpu(), ref.float().cpu())
    base = rec["none"]["times_s"]
    for r in rec.values():
        r["median_s"] = statistics.median(r["times_s"])
        r["measured_speedup"] = statistics.median(b / t for b, t in zip(base, r["times_s"]))
        ideal = r.get("ideal_speedup")
        r["measured_over_ideal"] = r["measured_speedup"] / ideal if ideal else None
    return {**rec, **skipped}


SYNTHETIC_L2C_THRESHOLD = 0.6


def synthetic_l2c(depth: int, steps: int):
    """L2C with a synthetic router: seeded N(0, 1) logits for every (step, unit), threshold 0.6 (about 66 % of the
    cache-step units reused; the embedded model's trained router reuses 64 % at 0.1). A router learned on random weights
    would mean nothing; L2C's speed depends only on which units are skipped, and the decisions are L2C's own
    (a table lookup per step and unit), so the timing is L2C's."""
    from stepcache.policies.l2c import L2C

    logits = torch.randn(steps, 2 * depth, generator=torch.Generator().manual_seed(0))
    return L2C(router=logits, threshold=SYNTHETIC_L2C_THRESHOLD)


def native_policy(spec: str, model, args):
    """``l2c`` without a router: :func:`synthetic_l2c`; anything else: the CLI's policy syntax."""
    if spec == "l2c":
        return synthetic_l2c(model.config.depth, args.steps)
    return build_policy(spec, args.steps, "ddim", embedded=False)


def native_section(model, noise, labels, args, device) -> dict:
    policies = {spec: native_policy(spec, model, args) for spec in args.specs}

    def run(policy):
        out, stats = stepcache.sample(model, noise, labels, args.steps, "ddim", args.cfg_scale, policy,
                                      return_stats=True)
        return out, {"ideal_speedup": stats.ideal_speedup, "compute_share": stats.mac_ratio,
                     "step_kinds": stats.kind_counts()}

    return rounds(policies, run, args.repeats, device)


# ------------------------------------------------------------------------------------------- peers
def diffusers_model(native, args, device, dtype):
    """(DiTTransformer2DModel, where its weights come from): the native model converted when this build has
    ``stepcache.models.convert``, else random weights of the same geometry (re-randomised like the native)."""
    from diffusers import DiTTransformer2DModel

    try:
        from stepcache.models import convert  # noqa: F401 - not in every build
    except ImportError:
        convert = None
    for name in ("to_diffusers", "native_to_diffusers", "dit_to_diffusers"):
        fn = getattr(convert, name, None)
        if callable(fn):
            # the same weights rebuilt (randomize_ is seeded) in float32 on the CPU: the timed model, maybe
            # compiled by now, stays as it is
            source = native_model(args, torch.device("cpu"), torch.float32)
            return fn(source).eval().to(device=device, dtype=dtype), f"converted ({convert.__name__}.{name})"
    c = native.config
    torch.manual_seed(0)
    tr = DiTTransformer2DModel(num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads,
                               in_channels=c.in_channels, out_channels=native.out_channels, num_layers=c.depth,
                               sample_size=c.input_size, patch_size=c.patch_size, num_embeds_ada_norm=c.num_classes)
    randomize_(tr, 0)
    return tr.eval().to(device=device, dtype=dtype), ("random, same geometry (stepcache.models.convert is not in "
                                                      "this build)")


def dit_pipeline(tr, device, dtype):
    """DiTPipeline with DiT's DDIM schedule and a one-block stub VAE (the check is about the transformer)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, layers_per_block=1)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              clip_sample=False)
    pipe = DiTPipeline(transformer=tr, vae=vae.eval().to(device=device, dtype=dtype), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class BlockWork:
    """Tokens through every block's first feed-forward projection: the same count of block work for every
    method (a hook on ``ff`` itself would also fire where diffusers' hooks return a cached value instead)."""

    def __init__(self, tr):
        self.tokens = 0
        self.hooks = [b.ff.net[0].register_forward_hook(self._count) for b in tr.transformer_blocks]

    def _count(self, _module, inputs, _out):
        self.tokens += inputs[0].shape[:-1].numel()


def peer_methods(pipe) -> dict:
    """name -> install() returning remove(); diffusers' hooks get the cache context DiT's pipeline never sets."""
    from diffusers.hooks import (FirstBlockCacheConfig, HookRegistry, TaylorSeerCacheConfig, apply_first_block_cache,
                                 apply_taylorseer_cache)
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    tr = pipe.transformer

    def ours(policy):
        return lambda: stepcache.apply(pipe, policy).remove

    def theirs(apply_fn, config, names):
        def install():
            apply_fn(tr, config)
            registry = HookRegistry.check_if_exists_or_initialize(tr)
            registry.invalidate_child_registries_cache()
            context = tr.register_forward_pre_hook(lambda *_: _set_cache_context(tr, CacheContext("cond_uncond")))
            registry.reset_stateful_hooks(recurse=True)

            def remove():
                context.remove()
                for name in names:
                    registry.remove_hook(name, recurse=True)
                registry.invalidate_child_registries_cache()
            return remove
        return install

    return {
        "none": lambda: (lambda: None),
        "stepcache fora(interval=3)": ours(stepcache.FORA(3)),
        f"stepcache fbcache(threshold={DYNAMIC_THRESHOLD})": ours(build_policy(
            f"fbcache:threshold={DYNAMIC_THRESHOLD}", 50, "ddim", embedded=False)),
        "stepcache taylorseer(interval=3, order=1)": ours(build_policy("taylorseer:interval=3,order=1", 50, "ddim",
                                                                       embedded=False)),
        f"diffusers FirstBlockCache({DYNAMIC_THRESHOLD})": theirs(
            apply_first_block_cache, FirstBlockCacheConfig(threshold=DYNAMIC_THRESHOLD),
            ["fbc_leader_block_hook", "fbc_block_hook"]),
        "diffusers TaylorSeer(interval 3, order 1)": theirs(apply_taylorseer_cache, TaylorSeerCacheConfig(
            cache_interval=3, disable_cache_before_step=2, max_order=1, taylor_factors_dtype=torch.float32,
            cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"]), ["taylorseer_cache"]),
        f"cache-dit DBCache(F1B0, {DYNAMIC_THRESHOLD})": cache_dit_install(pipe),
    }


def cache_dit_install(pipe):
    """cache-dit's DBCache on the whole pipeline (its own API); an import failure is raised at install, so the
    method is reported as skipped with the reason."""

    def install():
        import cache_dit

        cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=DYNAMIC_THRESHOLD, max_warmup_steps=4))
        return lambda: cache_dit.disable_cache(pipe)

    return install


def peers_section(native, args, device, dtype) -> dict:
    tr, weights = diffusers_model(native, args, device, dtype)
    pipe = dit_pipeline(tr, device, dtype)
    meter = BlockWork(tr)
    labels = [LABELS[k % len(LABELS)] for k in range(args.batch)]

    def run(install):
        remove = install()
        try:
            meter.tokens = 0
            out = pipe(class_labels=labels, guidance_scale=args.cfg_scale, num_inference_steps=args.steps,
                       generator=torch.Generator().manual_seed(0), output_type="pt").images
        finally:
            remove()
        return out, {"block_tokens": meter.tokens}

    rec = rounds(peer_methods(pipe), run, args.repeats, device)
    base = rec["none"]["block_tokens"]
    for r in (r for r in rec.values() if "skipped" not in r):
        r["compute_share"] = r["block_tokens"] / base
        r["ideal_speedup"] = base / r["block_tokens"]  # block work only (embeddings and adaLN left out)
        r["measured_over_ideal"] = r["measured_speedup"] / r["ideal_speedup"]
    return {"weights": weights, "methods": rec}


# ------------------------------------------------------------------------------------------- report
def markdown(record: dict) -> str:
    lines = [f"# GPU check: {record['model']}", "",
             f"{record['device']} ({record['device_name']}), {record['dtype']}, DDIM-{record['steps']}, "
             f"{record['batch']} labels x CFG {record['cfg_scale']}, {record['repeats']} rounds; "
             f"{record['date']}", "",
             "| section | method | median s | measured speedup | ideal speedup | measured / ideal | compute | "
             "peak MiB | PSNR dB |", "|---|---|---|---|---|---|---|---|---|"]
    for section, body in record["sections"].items():
        if "skipped" in body:
            lines.append(f"| {section} | skipped: {body['skipped']} | | | | | | | |")
            continue
        for name, r in body["methods"].items():
            if "skipped" in r:
                lines.append(f"| {section} | {name}: skipped ({r['skipped']}) | | | | | | | |")
                continue
            cells = [f"{r['median_s']:.3f}", f"{r['measured_speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x",
                     _num(r.get("measured_over_ideal")), f"{r['compute_share']:.3f}", _num(r.get("peak_mib"), 0),
                     _num(r["psnr_db_vs_uncached"], 1)]
            lines.append(f"| {section} | {name} | " + " | ".join(cells) + " |")
    notes = [f"- {s}: weights {b['weights']}" for s, b in record["sections"].items() if "weights" in b]
    return "\n".join(lines + [""] + notes) + "\n"


def _num(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def main(argv=None) -> dict:
    args = parse(argv)
    start = time.perf_counter()
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    model = native_model(args, device, dtype)
    noise, labels = inputs(model, args, device)
    sections = {}

    def write() -> dict:
        """The record so far (written after every section: a run cut short still leaves its results)."""
        rec = {"benchmark": "gpu_check", "model": "tiny DiT (4 blocks, width 64)" if args.tiny else
               "DiT-XL/2 geometry (28 blocks, width 1152, 256 tokens), random weights",
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
               "dtype": args.dtype, "steps": args.steps, "batch": args.batch, "cfg_scale": args.cfg_scale,
               "repeats": args.repeats, "command": "benchmarks/gpu_check.py " + " ".join(
                   sys.argv[1:] if argv is None else argv),
               "total_seconds": time.perf_counter() - start, "environment": environment(), "sections": sections}
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "gpu_check.json").write_text(json.dumps(rec, indent=2, default=str))
        (args.out_dir / "gpu_check.md").write_text(markdown(rec))
        return rec

    def section(name, fn):
        if time.perf_counter() - start > args.budget_s:
            sections[name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            return
        t0 = time.perf_counter()
        try:
            sections[name] = fn()
        except Exception as exc:  # noqa: BLE001 - a section that cannot run here is reported, not fatal
            sections[name] = {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        sections[name]["seconds"] = time.perf_counter() - t0
        print(f"{name}: {sections[name]['seconds']:.1f} s" + (f" (skipped: {sections[name]['skipped']})"
                                                               if "skipped" in sections[name] else ""), flush=True)
        write()

    section("native eager", lambda: {"methods": native_section(model, noise, labels, args, device)})
    if args.compile == "on" or (args.compile == "auto" and device.type == "cuda"):
        def compiled():
            compile_blocks(model)
            return {"methods": native_section(model, noise, labels, args, device)}
        section("native compiled", compiled)
    else:
        sections["native compiled"] = {"skipped": "--compile off (auto compiles on CUDA only)"}
    if args.peers == "auto":
        section("diffusers DiT eager", lambda: peers_section(model, args, device, dtype))
    else:
        sections["diffusers DiT eager"] = {"skipped": "--peers off"}

    record = write()
    print(markdown(record), end="")
    return record


if __name__ == "__main__":
    main()
