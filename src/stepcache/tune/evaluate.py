"""Measure one policy on one chunk of seeds against the uncached images of the same seeds.

Seeds are split once into fixed chunks (sampled as one batch each, the sampler's generator seeded
with the chunk's first seed), so a policy whose decisions look at the whole batch (FBCache, TeaCache)
always sees the same batches, and the uncached reference of every chunk is sampled exactly once and
kept (in memory and in ``references.pt`` beside the records). Image k of a chunk is drawn from its own
generator seeded with its seed, its label is ``seed mod num_classes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stepcache.core.policy import NoCache
from stepcache.eval.fidelity import psnr, ssim
from stepcache.sampling.sample import sample

REFERENCES_NAME = "references.pt"
FD_MIN_IMAGES = 8  # below this the Fréchet distance of a pool says nothing: it is left out


@dataclass(frozen=True)
class RunSpec:
    """What every sampling run of a tune shares."""

    sampler: str
    num_steps: int
    cfg_scale: float


def chunk_inputs(model, seeds) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (n, C, H, W), image k from generator ``seeds[k]`` (drawn on the CPU: the same on every device);
    labels ``seed mod num_classes``; both on the model's device."""
    cfg = model.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    labels = torch.tensor([int(s) % cfg.num_classes for s in seeds], dtype=torch.long)
    device = next(model.parameters()).device
    return noise.to(device), labels.to(device)


class Evaluator:
    """Samples chunks with and without a policy; uncached references computed once per chunk."""

    def __init__(self, model, run: RunSpec, judge: bool, folder: Path | None = None, fingerprint: str = ""):
        self.model, self.run, self.judge = model, run, judge
        self.path = Path(folder) / REFERENCES_NAME if folder is not None else None
        self.fingerprint = fingerprint  # the records header's digest: references of another tune are ignored
        self.refs: dict[tuple, torch.Tensor] = {}
        self.reference_runs = 0
        if self.path is not None and self.path.is_file():
            saved = torch.load(self.path, weights_only=True)
            if saved.get("fingerprint") == fingerprint:
                self.refs = {tuple(int(s) for s in k.split(",")): v for k, v in saved["chunks"].items()}

    def sample(self, policy, seeds, return_stats: bool = False, cfg_scale: float | None = None):
        noise, labels = chunk_inputs(self.model, seeds)
        gen = torch.Generator(device=noise.device).manual_seed(int(seeds[0]))
        cfg = self.run.cfg_scale if cfg_scale is None else cfg_scale
        out = sample(self.model, noise, labels, self.run.num_steps, self.run.sampler, cfg, policy, generator=gen,
                     return_stats=return_stats)
        if return_stats:  # images float32 on the CPU, where the metrics and the saved references live
            return out[0].float().cpu(), out[1]
        return out.float().cpu()

    def compute(self, policy, seed: int) -> dict:
        """Executed and uncached MACs of one unguided sample: the cheapest run that shows a policy's
        compute (exact for schedules fixed in advance, an estimate for ones that watch the features)."""
        _, stats = self.sample(policy, (seed,), return_stats=True, cfg_scale=1.0)
        return {"macs_executed": int(stats.macs_executed), "macs_uncached": int(stats.macs_uncached)}

    def reference(self, seeds) -> torch.Tensor:
        """The uncached images of ``seeds`` (one chunk), sampled on first use only."""
        key = tuple(int(s) for s in seeds)
        if key not in self.refs:
            self.refs[key] = self.sample(NoCache(), key)
            self.reference_runs += 1
            if self.path is not None:
                torch.save({"fingerprint": self.fingerprint,
                            "chunks": {",".join(map(str, k)): v for k, v in self.refs.items()}}, self.path)
        return self.refs[key]

    def measure(self, policy, seeds) -> dict:
        """Per-seed PSNR / SSIM vs the uncached chunk, the executed and uncached MACs, and (digit images)
        the judge's predicted class and features per image."""
        ref = self.reference(seeds)
        images, stats = self.sample(policy, seeds, return_stats=True)
        out = {"psnr": [round(float(v), 4) for v in psnr(images, ref).clamp(max=100.0)],
               "ssim": [round(float(v), 5) for v in ssim(images, ref)],
               "macs_executed": int(stats.macs_executed), "macs_uncached": int(stats.macs_uncached)}
        if self.judge:
            from stepcache.eval.digits import classify

            feats, logits = classify(images.clamp(-1, 1))
            out["pred"] = [int(v) for v in logits.argmax(1)]
            out["feats"] = np.round(feats, 4).tolist()
        return out


@dataclass(frozen=True)
class Figures:
    """A policy's quality and work over the seeds measured so far."""

    num_seeds: int
    psnr: float
    ssim: float
    ideal_speedup: float
    class_accuracy: float | None = None
    frechet_distance: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def figures(records: list[dict], labels: list[int] | None = None, fd: bool = False) -> Figures:
    """Pool eval records (chunks) into one set of figures: means over seeds, MACs summed over chunks.

    ``labels`` are the requested classes of the pooled seeds (for the judge's accuracy); ``fd`` adds the
    Fréchet distance of the pooled judge features against the held-out real digits.
    """
    p = [v for r in records for v in r["psnr"]]
    s = [v for r in records for v in r["ssim"]]
    executed = sum(r["macs_executed"] for r in records)
    uncached = sum(r["macs_uncached"] for r in records)
    acc = dist = None
    if labels is not None and all("pred" in r for r in records):
        preds = [v for r in records for v in r["pred"]]
        acc = float(np.mean([a == b for a, b in zip(preds, labels)]))
    if fd and all("feats" in r for r in records) and len(p) >= FD_MIN_IMAGES:
        from stepcache.eval.digits import reference_stats
        from stepcache.eval.metrics import FeatureStats

        feats = np.array([f for r in records for f in r["feats"]], dtype=np.float64)
        dist = float(FeatureStats.from_features(feats).frechet_distance(reference_stats("test")))
    return Figures(len(p), float(np.mean(p)), float(np.mean(s)), uncached / executed if executed else 1.0, acc, dist)
