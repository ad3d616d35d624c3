"""The speed-quality frontier: every stepcache policy and the peers on the embedded digits DiT, in one run.

Model: the embedded digits DiT (``stepcache.models.embedded.load_embedded()``), and the same weights converted
to diffusers' ``DiTTransformer2DModel`` (``stepcache.models.convert``) for the peers. Every run samples the same
``--seeds`` images (image k from its own generator ``seed + k``, EDM style; labels k mod 10) with DiT's exact
DDIM-50 sampler (``stepcache.sample``; diffusers' DDIMScheduler cannot produce DiT's respaced grid) and CFG
``--cfg-scale`` (the model's default 4.0), cond and uncond rows batched as in DiT.

- stepcache: each setting of :data:`STEPCACHE_SETTINGS` for every method the policy registry knows; the work
  is the handle's exact MAC count.
- peers (:mod:`frontier_peers`): diffusers FirstBlockCache, TaylorSeer (its default identifiers hook nothing on
  DiT: we hook ``attn1``, or ``attn1`` and ``ff``, and say which), MagCache (ratios from its own calibrate mode
  on this model, on other seeds), PyramidAttentionBroadcast, FasterCache; cache-dit DBCache with and without
  its TaylorSeer calibrator (transformer-only path, ``num_inference_steps`` set). Work is counted with forward
  hooks on modules that run only when a branch runs, with stepcache's MAC formula.

Recorded per run: block compute executed (fraction of uncached block MACs), ideal speedup (MACs, fixed work
included), measured wall time and speedup (median over ``--repeats`` interleaved rounds of the ratio to the
uncached run of the same model in the same round), PSNR and SSIM of the final images (clamped to [-1, 1]) vs
the uncached native run, class accuracy and Fréchet distance from the digit judge. Also measured: the converted
model's deviation from the native one, and the frequency-shift trap (diffusers' default
``downscale_freq_shift=1``). Outputs: ``frontier.json`` (+ environment, command, date), ``frontier.png``
(compute vs PSNR, every point labelled) and ``frontier.md``.

Usage: ``python benchmarks/bench_frontier.py`` (full run), ``--check`` (evaluate the claims of issue 11 on the
results file without running), ``--preset quick --seeds 2 --steps 3`` (smoke run, as the tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from stepcache.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from frontier_peers import (BlockMeter, DiffusersDenoiser, calibrate_mag_ratios, install_peer,  # noqa: E402
                            uncached_block_macs)
from frontier_report import evaluate_claims, markdown, plot, print_claims  # noqa: E402

# ------------------------------------------------------------------------------ the settings (data)
# method -> settings; a method the registry does not know (yet) is skipped and listed as such.
STEPCACHE_SETTINGS = {
    "fora": [{"interval": n} for n in (2, 3, 4)],
    "toca": [{"interval": 3, "fresh_ratio": 0.1}, {"interval": 3, "fresh_ratio": 0.1, "forecast": True}],
    "l2c": [{"threshold": 0.1}],  # the shipped DDIM-50 router
    "taylorseer": [{"interval": n, "order": k} for n, k in ((3, 1), (4, 2), (5, 2))],
    "forecast": [{"num_full": k, "order": 2} for k in (12, 15, 18, 20, 25)],  # spaced schedule, power 2
    "fbcache": [{"threshold": 0.05}],
    "magcache": [{"threshold": 0.06}],  # + this model's ratios (stepcache_calibration)
    "teacache": [{"threshold": 0.02}],  # + this model's polynomial
    "dbcache": [{"front": 1, "back": 0, "threshold": 0.08, "forecast": {"method": "taylorseer", "order": 1}}],
}
PEER_SETTINGS = {
    "diffusers-fbcache": [{"threshold": t} for t in (0.05, 0.1)],
    "diffusers-taylorseer": [{"interval": n, "order": k, "modules": "attn+ff"} for n, k in ((3, 1), (4, 1), (4, 2),
                                                                                           (5, 1))],
    "diffusers-magcache": [{"threshold": t} for t in (0.06, 0.24)],
    "diffusers-pab": [{"skip": 2}],
    "diffusers-fastercache": [{}],
    "cache-dit-dbcache": [{"threshold": t, "taylorseer": True} for t in (0.08, 0.12)],
}
# The run of a1369ac also had FORA(6), ToCa(4, 0.1), L2C(0.5), TaylorSeer(4,1)/(6,2)/attention-only, FBCache(0.1),
# MagCache(0.24), TeaCache(0.01, 0.03), DBCache(0.08) and the peers' attention-only TaylorSeer and uncalibrated
# DBCache; dropped here to keep one run under half an hour on the shared machine.
QUICK_STEPCACHE = {"fora": [{"interval": 2}], "taylorseer": [{"interval": 2, "order": 1, "warmup": 1}]}
QUICK_PEERS = {"diffusers-fbcache": [{"threshold": 0.1}], "cache-dit-dbcache": [{"threshold": 0.1, "warmup": 1}]}


def stepcache_policy(method: str, params: dict, num_steps: int):
    """(policy config, None) from the policy registry, or (None, reason) when this build cannot run it.
    The one place that knows where the registry lives."""
    from stepcache.bench.methods import build_policy, method_unavailable
    from stepcache.core.policy import PolicyConfig, known_methods

    if method not in known_methods():
        return None, f"{method} is not in this stepcache build's policy registry"
    reason = method_unavailable(method, num_steps, "ddim", embedded=True)
    if reason:
        return None, reason
    if method == "l2c":  # the shipped router is found by the bench's spec parser
        spec = method + ":" + ",".join(f"{k}={json.dumps(v)}" for k, v in params.items())
        return build_policy(spec, num_steps, "ddim", embedded=True), None
    return PolicyConfig.from_dict({"method": method, **params}), None


def stepcache_calibration(model, run: Callable[[], object]) -> dict:
    """stepcache's own calibration (``stepcache calibrate``'s engine) from uncached runs: MagCache's ratios and
    TeaCache's polynomial for THIS model; {} when this build has none."""
    try:
        from stepcache.training.calibrate import calibrate
    except ImportError:
        return {}
    try:
        out = calibrate(model, run)
    except ConfigError as exc:  # e.g. too few steps for TeaCache's fit: those methods are then skipped
        return {"error": str(exc)}
    return {"magcache": {"mag_ratios": [float(v) for v in out["mag_ratios"]]},
            "teacache": ({"coefficients": [float(v) for v in out["teacache_coefficients"]]}
                         if out.get("teacache_coefficients") is not None else {}),
            "teacache_r2": out.get("teacache_r2")}


# ------------------------------------------------------------------------------ runs
def branch_macs(stats, model, rows: int) -> float:
    """Attention and MLP work a stepcache run executed, from the handle's per-step, per-site token counts and the
    adapter's own MAC formula (the quantity the peers' meter counts). A policy's own work (forecast arithmetic,
    indicators) is reported apart, as ``policy_fraction``."""
    from stepcache.adapters.dit import dit_macs

    macs = dit_macs(model)
    return float(sum(rows * macs[site.split(".")[1]](k) for per_site in stats.decisions.values()
                     for site, k in per_site.items()))


class Clock:
    """Wall and process-CPU seconds of a block; CPU time is the steadier of the two on a shared machine."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


@dataclass
class Entry:
    """One setting of one method, and how to run it once."""

    side: str        # "stepcache", "diffusers" or "cache-dit"
    method: str
    params: dict
    label: str
    run: Callable = None          # () -> (images, work dict, Clock of the sampling alone)
    times: list = field(default_factory=list)
    cpu_times: list = field(default_factory=list)
    result: dict = field(default_factory=dict)


def stepcache_label(method: str, params: dict) -> str:
    """``stepcache taylorseer(interval=4, order=1)``: the settings as given (calibration data left out)."""
    def show(v):
        if isinstance(v, dict):
            inner = ", ".join(f"{k}={w}" for k, w in v.items() if k != "method")
            return f"{v.get('method', '')}({inner})"
        return v

    return f"stepcache {method}(" + ", ".join(f"{k}={show(v)}" for k, v in params.items()) + ")"


def peer_label(kind: str, p: dict) -> str:
    side, name = kind.split("-", 1) if kind.startswith("diffusers") else ("cache-dit", kind.split("-", 2)[2])
    shown = {k: v for k, v in p.items() if k != "mag_ratios"}
    names = {"fbcache": "FirstBlockCache", "taylorseer": "TaylorSeer", "magcache": "MagCache", "pab": "PAB",
             "fastercache": "FasterCache", "dbcache": "DBCache"}
    if name == "dbcache":
        shown = {"F": shown.pop("Fn", 1), "B": shown.pop("Bn", 0), **shown}
        if shown.pop("taylorseer", False):
            name, shown = "dbcache", {**shown, "+TaylorSeer": shown.pop("order", 1)}
    inner = ", ".join(f"{k}={v}" for k, v in shown.items())
    return f"{side} {names[name]}({inner})"


class Bench:
    """Shared state of one benchmark run: models, inputs, references, and the two kinds of entries."""

    def __init__(self, args):
        from stepcache.bench.runner import make_inputs
        from stepcache.models.convert import dit_to_diffusers
        from stepcache.models.embedded import load_embedded

        self.args = args
        self.model = load_embedded()
        self.base = dit_to_diffusers(self.model).eval()
        self.noise, self.labels = make_inputs(self.model, args.seeds, args.seed)
        self.rows = 2 * args.seeds if args.cfg_scale > 1 else args.seeds
        self.block_uncached = uncached_block_macs(self.model, args.steps, self.rows)
        from stepcache.adapters.dit import dit_macs

        macs = dit_macs(self.model)  # fixed work per call, each block's adaLN counted as always run (peers' ideal)
        self.fixed = float(macs["fixed"] + len(self.model.blocks) * macs["block"]) * self.rows * args.steps
        self.meter = BlockMeter(self.model, self.model)  # cross-check of stepcache's own MAC count

    def sample(self, model_fn, policy=None, noise=None, labels=None):
        from stepcache import sample

        noise = self.noise if noise is None else noise
        labels = self.labels if labels is None else labels
        return sample(model_fn, noise, labels, self.args.steps, "ddim", self.args.cfg_scale, policy,
                      generator=torch.Generator().manual_seed(self.args.seed), return_stats=True)

    def work(self, block_macs: float) -> dict:
        return {"block_fraction": block_macs / self.block_uncached,
                "ideal_speedup": (self.block_uncached + self.fixed) / (block_macs + self.fixed)}

    # -------------------------------------------------------------- stepcache
    def stepcache_run(self, policy):
        def run():
            self.meter.reset()
            with Clock() as clock:
                images, stats = self.sample(self.model, policy)
            block = branch_macs(stats, self.model, self.rows)
            return images, {**self.work(block), "ideal_speedup": stats.ideal_speedup,
                            "policy_fraction": getattr(stats, "macs_policy", 0) / self.block_uncached,
                            "hook_block_fraction": self.meter.macs / self.block_uncached}, clock

        return run

    # -------------------------------------------------------------- peers
    def peer_run(self, kind: str, params: dict):
        def run():
            inst = install_peer(kind, params, self.base, self.model.num_classes, self.args.steps)
            meter = BlockMeter(inst.denoiser.transformer, self.model)
            inst.denoiser.meter = meter
            try:
                inst.reset()
                with Clock() as clock, torch.no_grad():
                    images, _ = self.sample(inst.denoiser)
                full_call = self.block_uncached / self.args.steps
                reduced = [k for k, m in enumerate(meter.per_call) if m < full_call - 0.5]
                extra = {"calls": len(meter.per_call), "reduced_calls": reduced, **inst.summary()}
                if "cached_steps" in extra:  # cache-dit's own record of cached steps vs the calls that skipped work
                    extra["cached_steps_match_reduced_calls"] = extra["cached_steps"] == reduced
                return images, {**self.work(meter.macs), "extra": extra}, clock
            finally:
                meter.close()
                inst.remove()

        return run

    def diffusers_uncached(self, shift: float = 0.0):
        from stepcache.models.convert import set_frequency_shift

        def run():
            import copy

            tr = set_frequency_shift(copy.deepcopy(self.base), shift)
            meter = BlockMeter(tr, self.model)
            try:
                with Clock() as clock, torch.no_grad():
                    images, _ = self.sample(DiffusersDenoiser(tr, self.model.num_classes))
                return images, self.work(meter.macs), clock
            finally:
                meter.close()

        return run

    def entries(self, mag_ratios, calibration: dict) -> tuple[list[Entry], list[dict]]:
        quick = self.args.preset == "quick"
        ours, peers = (QUICK_STEPCACHE, QUICK_PEERS) if quick else (STEPCACHE_SETTINGS, PEER_SETTINGS)
        from stepcache.core.policy import NoCache  # the uncached run, with the same accounting

        out = [Entry("stepcache", "none", {}, "stepcache uncached", self.stepcache_run(NoCache())),
               Entry("diffusers", "none", {}, "diffusers uncached", self.diffusers_uncached())]
        skipped = []
        keep = lambda side, method: side in self.args.sides and (not self.args.methods or method in self.args.methods)
        for method, settings in ours.items():
            if not keep("stepcache", method):
                continue
            for params in settings:
                try:
                    policy, reason = stepcache_policy(method, {**params, **calibration.get(method, {})},
                                                      self.args.steps)
                except ConfigError as exc:  # a calibrated method without its calibration, a bad setting
                    policy, reason = None, str(exc)
                if policy is None:
                    skipped.append({"side": "stepcache", "method": method, "params": params, "reason": reason})
                    continue
                out.append(Entry("stepcache", method, params, stepcache_label(method, params),
                                 self.stepcache_run(policy)))
        for kind, settings in peers.items():
            if not keep("cache-dit" if kind.startswith("cache-dit") else "diffusers", kind):
                continue
            for params in settings:
                if kind == "diffusers-magcache":
                    params = {**params, "mag_ratios": mag_ratios}
                side = "cache-dit" if kind.startswith("cache-dit") else "diffusers"
                out.append(Entry(side, kind, params, peer_label(kind, params), self.peer_run(kind, params)))
        return out, skipped


# ------------------------------------------------------------------------------ measurement
def first_pass(bench: Bench, entries: list[Entry], reference: torch.Tensor | None) -> torch.Tensor:
    """Run every entry once: images, work, quality, and the first timing round."""
    from stepcache.eval.digits import score_digits
    from stepcache.eval.fidelity import fidelity

    for e in entries:
        try:
            images, work, clock = e.run()
        except Exception as exc:  # noqa: BLE001 - one failing peer must not lose the others' numbers
            e.result = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{e.label:55s} FAILED {e.result['error']}", flush=True)
            continue
        e.times.append(clock.wall)
        e.cpu_times.append(clock.cpu)
        if reference is None:
            bench.raw_reference = images  # the uncached native latents, unclamped
            reference = images.clamp(-1, 1)
        images = images.clamp(-1, 1)
        q = fidelity(images, reference)
        s = score_digits(images, bench.labels)
        e.result = {**work, **q, "class_accuracy": s.class_accuracy, "frechet_distance": s.frechet_distance,
                    "max_abs_diff": float((images - reference).abs().max())}
        print(f"{e.label:55s} compute {work['block_fraction']:.3f}  PSNR {q['psnr']:6.2f}  "
              f"{clock.wall:6.2f}s", flush=True)
    return reference


def timing_rounds(entries: list[Entry], rounds: int) -> None:
    """Further rounds, every entry in turn, so a drift of the machine's speed hits all alike."""
    live = [e for e in entries if "error" not in e.result]
    for r in range(rounds):
        for e in live:
            clock = e.run()[2]
            e.times.append(clock.wall)
            e.cpu_times.append(clock.cpu)
        print(f"timing round {r + 2}: done", flush=True)


def speedups(entries: list[Entry]) -> None:
    """Median over rounds of (uncached time of the same model in that round / this entry's time)."""
    for e in entries:
        if "error" in e.result:
            continue
        ref = entries[0] if e.side == "stepcache" else entries[1]
        e.result["times_s"], e.result["cpu_times_s"] = e.times, e.cpu_times
        e.result["median_s"] = statistics.median(e.times)
        e.result["speedup"] = statistics.median([a / b for a, b in zip(ref.times, e.times)])
        e.result["cpu_speedup"] = statistics.median([a / b for a, b in zip(ref.cpu_times, e.cpu_times)])
        e.result["measured_over_ideal"] = e.result["speedup"] / e.result["ideal_speedup"]


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------ main
def parse(argv=None) -> argparse.Namespace:
    from stepcache.models.embedded import DEFAULT_CFG, DEFAULT_STEPS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=40, help="images, one seed each (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps (default: %(default)s)")
    p.add_argument("--cfg-scale", type=float, default=DEFAULT_CFG, help="CFG scale (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--calibration-seeds", type=int, default=8,
                   help="images for MagCache's calibration, seeds after the benchmark's (default: %(default)s)")
    p.add_argument("--preset", choices=("full", "quick"), default="full", help="settings tables (default: full)")
    p.add_argument("--sides", nargs="+", choices=("stepcache", "diffusers", "cache-dit"),
                   default=["stepcache", "diffusers", "cache-dit"], help="which sides to run (default: all)")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (registry or peer names)")
    p.add_argument("--no-trap", action="store_true", help="skip measuring the frequency-shift trap")
    p.add_argument("--check", action="store_true", help="evaluate the issue's claims on --out and exit")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/frontier.json",
                   help="results JSON; the .png and .md go beside it (default: %(default)s)")
    return p.parse_args(argv)


def measure_traps(bench: Bench, reference: torch.Tensor) -> dict:
    """Converted model vs native (uncached), and the latent error with diffusers' default frequency shift."""
    images = bench.diffusers_uncached(shift=1.0)()[0]
    return {"max_abs_error_with_diffusers_default_freq_shift": float((images - bench.raw_reference).abs().max()),
            "psnr_with_diffusers_default_freq_shift": float(
                __import__("stepcache.eval.fidelity", fromlist=["fidelity"]).fidelity(images.clamp(-1, 1),
                                                                                      reference)["psnr"])}


def main(argv=None) -> int:
    args = parse(argv)
    if args.check:
        record = json.loads(args.out.read_text())
        return 0 if print_claims(evaluate_claims(record["runs"])) else 1
    torch.set_num_threads(args.threads)
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # read once, when cache_dit is first imported
    import diffusers
    from stepcache.bench.records import environment

    diffusers.utils.logging.set_verbosity_error()
    started = time.time()
    bench = Bench(args)
    calib = bench.args.seed + 10_000
    from stepcache.bench.runner import make_inputs

    cnoise, clabels = make_inputs(bench.model, args.calibration_seeds, calib)
    mag_ratios = calibrate_mag_ratios(bench.base, lambda den: bench.sample(den, noise=cnoise, labels=clabels),
                                      bench.model.num_classes, args.steps)
    calibration = stepcache_calibration(bench.model, lambda: bench.sample(bench.model, noise=cnoise, labels=clabels))
    entries, skipped = bench.entries(mag_ratios, calibration)
    reference = first_pass(bench, entries, None)
    traps = {"diffusers_uncached_vs_native_max_abs (clamped images)": entries[1].result.get("max_abs_diff")}
    if not args.no_trap:
        traps.update(measure_traps(bench, reference))
    timing_rounds(entries, args.repeats - 1)
    speedups(entries)
    runs = [{"side": e.side, "method": e.method, "params": {k: v for k, v in e.params.items() if k != "mag_ratios"},
             "label": e.label, **e.result} for e in entries]
    claims = evaluate_claims(runs)
    record = {
        "benchmark": "bench_frontier", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python " + " ".join([Path(sys.argv[0]).name if argv is None else "bench_frontier.py",
                                         *(sys.argv[1:] if argv is None else argv)]),
        "wall_seconds": time.time() - started,
        "environment": {**environment(), "diffusers": diffusers.__version__, "cache_dit": _version("cache-dit")},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"name": "embedded digits DiT", "depth": len(bench.model.blocks), "tokens": bench.model.num_tokens,
                  "width": bench.model.pos_embed.shape[-1], "rows_per_call": bench.rows},
        "calibration": {"seeds": [calib, calib + args.calibration_seeds - 1], "diffusers_magcache_ratios": mag_ratios,
                        "stepcache": calibration},
        "traps": traps, "skipped": skipped, "runs": runs, "claims": claims,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    args.out.with_suffix(".md").write_text(markdown(runs))
    plot(runs, args.out.with_suffix(".png"),
         f"embedded digits DiT, DDIM-{args.steps}, CFG {args.cfg_scale}, {args.seeds} seeds: "
         f"block compute vs PSNR (labels: measured wall-clock speedup)")
    print(markdown(runs))
    print(json.dumps(traps))
    print_claims(claims)
    print(f"wrote {args.out} (+ .md, .png) in {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
