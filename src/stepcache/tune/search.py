"""Successive halving (Jamieson & Talwalkar, arXiv 1502.07943) over the candidates, target-aware.

The tuner has already dropped what a speed target rules out on compute alone (one unguided sample per
candidate, :meth:`stepcache.tune.tuner.Tuner.prune_by_compute`). Rung 0 samples every remaining
candidate on the first small chunk of calibration seeds; each later rung adds a
chunk twice as large and keeps the best ``1/eta`` of the feasible candidates (never fewer than
``keep``), so the survivors are judged on more and more seeds. A hand-written loop: the grid is small
and discrete, and every measurement is a record the next run can reuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stepcache.errors import ConfigError
from stepcache.tune.evaluate import Figures

KINDS = ("speedup", "psnr", "fd")


@dataclass(frozen=True)
class Target:
    """``speedup``: best PSNR with ideal speedup >= value; ``psnr``: fastest with PSNR >= value;
    ``fd``: fastest with judge Fréchet distance <= value."""

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"Unknown tune target {self.kind!r}; choose one of {', '.join(KINDS)}.")
        if not math.isfinite(self.value) or (self.kind == "speedup" and self.value < 1) or self.value < 0:
            raise ConfigError(f"The {self.kind} target must be a finite number"
                              f"{' >= 1' if self.kind == 'speedup' else ' >= 0'}, got {self.value}.")

    def feasible(self, f: Figures) -> bool:
        if self.kind == "speedup":
            return f.ideal_speedup >= self.value - 1e-9
        if self.kind == "psnr":
            return f.psnr >= self.value
        return f.frechet_distance is None or f.frechet_distance <= self.value  # None: too few images yet

    def score(self, f: Figures) -> tuple:
        """Higher is better: PSNR first under a speed target, speed first under a quality target."""
        if self.kind == "speedup":
            return (f.psnr, f.ideal_speedup)
        return (f.ideal_speedup, f.psnr)

    def describe(self) -> str:
        return {"speedup": f"best PSNR at >= {self.value:.3g}x ideal speedup",
                "psnr": f"fastest at >= {self.value:g} dB PSNR",
                "fd": f"fastest at judge FD <= {self.value:g}"}[self.kind]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}


def seed_chunks(seeds: list[int], first: int) -> list[tuple[int, ...]]:
    """``first, first, 2 first, 4 first, ...`` seeds per chunk; the last chunk takes what is left."""
    if first < 1:
        raise ConfigError(f"The first chunk needs at least 1 seed, got {first}.")
    chunks, start, size = [], 0, first
    while start < len(seeds):
        chunks.append(tuple(seeds[start:start + size]))
        start += size
        size = first if len(chunks) == 1 else size * 2
    return chunks


def halving(candidates, measure_rung, pooled, chunks, target: Target, eta: int = 3, keep: int = 3,
            log=print) -> tuple[list, dict]:
    """Run the rungs; returns (survivors ranked best first, {candidate key: figures at its last rung}).

    ``measure_rung(candidates, chunk, r)`` returns {candidate key: the chunk's record} (a record with
    ``"error"`` when the policy refused this model); ``pooled(candidate, chunks)`` pools a candidate's
    records into :class:`Figures`.
    """
    if eta < 2 or keep < 1:
        raise ConfigError(f"eta must be >= 2 and keep >= 1, got {eta} and {keep}.")
    alive, seen = list(candidates), {}
    for r, chunk in enumerate(chunks):
        recs = measure_rung(alive, chunk, r)
        ok = [c for c in alive if "error" not in recs[c.key]]
        for c in ok:
            seen[c.key] = pooled(c, chunks[:r + 1])
        feasible = sorted((c for c in ok if target.feasible(seen[c.key])),
                          key=lambda c: target.score(seen[c.key]), reverse=True)
        last = r == len(chunks) - 1
        alive = feasible if last else feasible[:max(keep, math.ceil(len(feasible) / eta))]
        log(f"tune: rung {r}: {len(ok)} measured on {sum(map(len, chunks[:r + 1]))} seeds, "
            f"{len(feasible)} meet the target, {len(alive)} go on")
        if not alive:
            break
    return alive, seen
