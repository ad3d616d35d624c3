"""The clock and what a policy may know: the run, the step, the model's sites.

Policies key their schedules on the respaced index ``i`` counting down from ``S-1`` to 0 (the
convention of DiT's loops, which FORA, ToCa and L2C all use), never on a forward-call counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


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
    """The model call being made. ``i`` counts down from ``num_steps - 1``; ``t`` is the model timestep;
    ``call`` the index of the model call within the step (a pipeline with true CFG calls twice: each
    call keeps its own state); ``stage`` the solver stage within the step (multi-evaluation solvers)."""

    i: int
    num_steps: int
    t: float = 0.0
    call: int = 0
    stage: int = 0

    @property
    def is_first(self) -> bool:
        return self.i == self.num_steps - 1

    @property
    def progress(self) -> int:
        """Steps already taken: 0 at the first step."""
        return self.num_steps - 1 - self.i


class SiteKey(NamedTuple):
    """A place a policy acts on.

    Branch site: ``SiteKey(layer, "attn" | "mlp" | "cross" | ...)``, one branch of one block.
    Span site: ``SiteKey(start, "span", end)``, blocks ``start .. end-1`` as one unit whose output is
    the residual they add to the hidden states (out - in).
    """

    layer: int
    name: str
    end: int | None = None

    @property
    def is_span(self) -> bool:
        return self.end is not None

    def __str__(self) -> str:
        return f"{self.layer}-{self.end - 1}.span" if self.is_span else f"{self.layer}.{self.name}"


@dataclass(frozen=True)
class LayerGroup:
    """Blocks ``start .. end-1`` that share a token geometry: each row is ``sequences`` sequences of
    ``grid`` (h, w) tokens (a video's spatial blocks: T frames of H*W; temporal blocks: H*W positions of T)."""

    name: str
    start: int
    end: int
    grid: tuple[int, int]
    sequences: int = 1


@dataclass(frozen=True)
class ModelInfo:
    """What a policy may know of the model, given by its adapter. ``capabilities`` name what the
    adapter can provide beyond plain outputs ("attention_map", "modulated_input", ...): policies test
    capabilities, never model family names (``family`` is for messages and records only)."""

    depth: int
    num_tokens: int
    grid: tuple[int, int]
    branches: tuple[str, ...]
    family: str = "dit"
    capabilities: frozenset = frozenset()
    groups: tuple[LayerGroup, ...] = ()
    variant: str | None = None  # a policy variant the model's reference calls for (e.g. ToCa "pixart")
    names: tuple[str, ...] = ()  # this model's weights by name (e.g. "embedded"), for published per-model data
