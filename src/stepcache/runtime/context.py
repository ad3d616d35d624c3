"""The clock: what step the sampler is on, published before every model call.

Policies key their schedules on the respaced index ``i`` counting down from ``S-1`` to 0 (the
convention of DiT's loops, which FORA, ToCa and L2C all use), never on a forward-call counter.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunInfo:
    """One sampling run: S steps over ``batch`` rows; with CFG the rows are [cond; uncond]
    (``uncond_first``: [uncond; cond], as diffusers' PixArt and SD3 pipelines batch them)."""

    num_steps: int
    batch: int
    cfg: bool = False
    uncond_first: bool = False
    stages: int = 1  # model evaluations per step: 2 for DPM-Solver++(2S) (start, midpoint)


@dataclass(frozen=True)
class StepContext:
    """The step being computed. ``i`` counts down from ``num_steps - 1``; ``t`` is the model timestep."""

    i: int
    num_steps: int
    t: float = 0.0
    call: int = 0  # index of the model call within this step (pipelines may call twice)
    stage: int = 0  # solver stage within the step: 0 its start, 1 its midpoint (DPM-Solver++(2S))

    @property
    def is_first(self) -> bool:
        return self.i == self.num_steps - 1

    @property
    def progress(self) -> int:
        """Steps already taken: 0 at the first step."""
        return self.num_steps - 1 - self.i
