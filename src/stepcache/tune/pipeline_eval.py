"""The tuner's evaluator for a diffusers pipeline: prompts are the calibration and held-out sets.

The tuner speaks in integer "seeds" (calibration ``0..n-1``, held-out ``n..n+m-1``). Here seed ``i``
names job ``i``: a prompt (or a DiT class) and the generator seed ``base_seed + i``; a chunk of jobs is
one pipeline call, a batch of prompts. Everything else is :class:`~stepcache.tune.evaluate.Evaluator`'s:
the uncached images of each chunk are made once and kept in ``references.pt`` beside the records (so a
resumed tune makes none again), and a policy is scored by PSNR / SSIM against them.

Quality is measured on the DECODED images (what users see, scaled from [0, 1] to [-1, 1] like every other
PSNR here), so the tuner refuses a pipeline without a VAE. Executed and uncached MACs come from the
handle's stats of the same run (``stepcache.apply(pipe, policy)``).
"""

from __future__ import annotations

from dataclasses import dataclass

from stepcache.api import apply
from stepcache.errors import ConfigError
from stepcache.sampling.pipelines import Request, family_of, outputs_are_images, run_pipeline
from stepcache.tune.evaluate import Evaluator, RunSpec


@dataclass(frozen=True)
class PipelineJobs:
    """The prompts of a pipeline tune (calibration first, then held-out) and how each is sampled."""

    calibration: tuple
    held_out: tuple
    base_seed: int = 0
    height: int | None = None
    width: int | None = None

    def __post_init__(self):
        if not self.calibration or not self.held_out:
            raise ConfigError("A pipeline tune needs at least 1 calibration and 1 held-out prompt.")

    @property
    def items(self) -> tuple:
        return self.calibration + self.held_out

    def header(self) -> dict:
        """What the tune records' header holds: another prompt set or size is another tune."""
        return {"calibration": list(self.calibration), "held_out": list(self.held_out), "base_seed": self.base_seed,
                "height": self.height, "width": self.width, "psnr_on": "decoded images"}


def split_prompts(prompts, held_out=()) -> tuple[tuple, tuple]:
    """(calibration, held-out): ``held_out`` when given, else the last third of ``prompts`` (at least one)."""
    prompts, held_out = tuple(prompts), tuple(held_out)
    if held_out:
        return prompts, held_out
    if len(prompts) < 2:
        raise ConfigError("Give at least 2 prompts (a third are held out) or --heldout-prompt.")
    n = max(1, len(prompts) // 3)
    return prompts[:-n], prompts[-n:]


class PipelineEvaluator(Evaluator):
    """:class:`Evaluator` with a pipeline call in place of the native sampler."""

    def __init__(self, pipe, jobs: PipelineJobs, run: RunSpec, folder=None, fingerprint: str = ""):
        family_of(pipe)  # an unsupported pipeline class: one sentence naming the supported ones
        if not outputs_are_images(pipe):
            raise ConfigError(f"{type(pipe).__name__} has no VAE; the pipeline tuner measures PSNR on decoded "
                              "images.")
        super().__init__(pipe.transformer, run, judge=False, folder=folder, fingerprint=fingerprint)
        self.pipe, self.jobs = pipe, jobs

    def sample(self, policy, seeds, return_stats: bool = False, cfg_scale: float | None = None):
        """Images (n, 3, H, W) in [-1, 1] on the CPU of jobs ``seeds`` under ``policy`` (and its stats)."""
        idx = [int(s) for s in seeds]
        guidance = self.run.cfg_scale if cfg_scale is None else cfg_scale
        request = Request(tuple(self.jobs.items[i] for i in idx), tuple(self.jobs.base_seed + i for i in idx),
                          self.run.num_steps, guidance, self.jobs.height, self.jobs.width)
        with apply(self.pipe, policy) as handle:  # the pipeline itself: no search for the pipeline of a transformer
            images = run_pipeline(self.pipe, request) * 2 - 1  # (n, 3, H, W), [0, 1] -> [-1, 1]
            stats = handle.stats()
        return (images, stats) if return_stats else images
