"""Measure policies on one model: warm-up, interleaved timing rounds, work (NFEs, MACs), quality.

Every policy of a sweep samples the same seeds (image k's noise comes from its own generator seeded
``seed + k``, EDM-style), so cached images are compared image by image with the uncached ones (PSNR,
SSIM) and, on the embedded digits model, scored by the digit judge (class accuracy, Fréchet distance
vs held-out digits, IS analogue).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from stepcache.bench.methods import policy_key_dict, policy_label
from stepcache.bench.records import config_key, environment
from stepcache.errors import ConfigError
from stepcache.eval.fidelity import fidelity
from stepcache.sampling.precision import synchronize
from stepcache.sampling.sample import sample


@dataclass(frozen=True)
class RunSettings:
    """What every policy of a sweep shares."""

    num_samples: int = 20
    seed: int = 0
    num_steps: int = 50
    sampler: str = "ddim"
    cfg_scale: float = 1.5
    warmup: int = 1
    repeats: int = 3

    def validate(self) -> None:
        if self.num_samples < 2:
            raise ConfigError(f"num_samples must be >= 2, got {self.num_samples}.")
        if self.repeats < 1 or self.warmup < 0:
            raise ConfigError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}.")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def make_inputs(model, num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (n, C, H, W) float32, image k from generator ``seed + k`` (drawn on the CPU, so every device
    gets the same noise) and labels k mod num_classes, both on the model's device."""
    cfg = model.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + k))
                         for k in range(num_samples)])
    labels = torch.arange(num_samples) % cfg.num_classes
    device = model_device(model)
    return noise.to(device), labels.to(device)


def run_once(model, noise, labels, settings: RunSettings, policy, steps=None, progress=False):
    """(images (float32, on the CPU), CacheStats, seconds) of one sampling run; on a GPU the clock waits for
    the queued kernels at both ends."""
    gen = torch.Generator(device=noise.device).manual_seed(settings.seed)
    synchronize(noise.device)
    t0 = time.perf_counter()
    images, stats = sample(model, noise, labels, steps or settings.num_steps, settings.sampler,
                           settings.cfg_scale, policy, generator=gen, progress=progress, return_stats=True)
    synchronize(noise.device)
    seconds = time.perf_counter() - t0
    return images.float().cpu(), stats, seconds


def warm_up(model, noise, labels, settings: RunSettings) -> None:
    """``settings.warmup`` short uncached runs (2 steps, same batch: some policies, e.g. L2C, are tied to the
    step count, so the warm-up does not run them)."""
    from stepcache.core.policy import NoCache

    for _ in range(settings.warmup):
        run_once(model, noise, labels, settings, NoCache(), steps=min(2, settings.num_steps))


def interleaved(model, noise, labels, settings: RunSettings, policies: list, progress=False, log=None) -> list:
    """Warm-up, then ``settings.repeats`` rounds in each of which every policy runs once, in order:
    [(images, stats, [seconds per round]), ...] in the order of ``policies``.

    Why rounds: on a shared or throttling machine the speed drifts over minutes, and a baseline timed
    minutes before a policy makes their ratio measure the drift. A ratio taken within one round sees
    (nearly) the same machine; :func:`speedup` takes the median of those ratios."""
    warm_up(model, noise, labels, settings)
    out = [[None, None, []] for _ in policies]
    for r in range(settings.repeats):
        for k, policy in enumerate(policies):
            if log is not None:
                log(f"round {r + 1}/{settings.repeats}: {policy_label(policy)}")
            images, stats, seconds = run_once(model, noise, labels, settings, policy, progress=progress)
            out[k][0], out[k][1] = images, stats
            out[k][2].append(seconds)
    return [tuple(o) for o in out]


def timed(model, noise, labels, settings: RunSettings, policy, progress=False):
    """One policy alone: warm-up, then ``repeats`` full runs: (images, stats, times)."""
    return interleaved(model, noise, labels, settings, [policy], progress)[0]


def speedup(base_times: list[float] | None, times: list[float]) -> tuple[float, list[float]]:
    """(median of the per-round ratios baseline / policy, the ratios); (1.0, []) without a baseline.

    Rounds pair up by index (both lists come from one :func:`interleaved` call); a baseline of another
    length (older records) falls back to the ratio of the medians."""
    if not base_times:
        return 1.0, []
    if len(base_times) != len(times):
        return statistics.median(base_times) / statistics.median(times), []
    ratios = [b / t for b, t in zip(base_times, times)]
    return statistics.median(ratios), ratios


def quality(images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None, judge: bool) -> dict:
    """PSNR / SSIM vs ``reference`` (same seeds) and, for digit images, the judge's scores."""
    out = {}
    labels = labels.cpu()
    if reference is not None:
        out.update(fidelity(images, reference))
    if judge:
        from stepcache.eval.digits import score_digits

        s = score_digits(images, labels)
        out.update(class_accuracy=s.class_accuracy, frechet_distance=s.frechet_distance,
                   inception_score=s.inception_score)
    return out


def make_config(model_id: dict, settings: RunSettings, policy) -> dict:
    return {"model": model_id, "policy": policy_key_dict(policy), "threads": torch.get_num_threads(),
            **asdict(settings)}


def make_record(config: dict, policy, times: list[float], stats, base_times, q: dict) -> dict:
    """One JSON record. ``base_times``: the uncached run's seconds per round of the same interleaved
    measurement (a single float, or None for the baseline itself)."""
    if isinstance(base_times, (int, float)):
        base_times = [float(base_times)] * len(times)
    ratio, ratios = speedup(base_times, times)
    return {
        "key": config_key(config), "label": policy_label(policy), "config": config, "environment": environment(),
        "time": {"median_s": statistics.median(times), "runs_s": times, "speedup": ratio, "round_ratios": ratios,
                 "interleaved": True},
        "work": {"nfe": stats.nfe, "macs_executed": stats.macs_executed, "macs_uncached": stats.macs_uncached,
                 "ideal_speedup": stats.ideal_speedup, "share_computed": stats.share_computed(),
                 "macs_fixed_skipped": stats.macs_fixed_skipped,
                 "bytes_read": stats.bytes_by_kind()["read"], "bytes_written": stats.bytes_by_kind()["written"]},
        "quality": q, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
