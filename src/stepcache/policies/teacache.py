"""TeaCache: skip the whole block stack while the rescaled change of the timestep-modulated input
stays small (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model",
arXiv 2411.19108, CVPR 2025; reference: ali-vilab/TeaCache).

The indicator is the first block's modulated input m_s = LN(x) * (1 + scale) + shift, made with the
CURRENT step's conditioning (the adapter's ``modulated_input`` probe). Each step:
``rel = mean|m_s - m_prev| / mean|m_prev|`` (model dtype, whole batch), m_prev := m_s on EVERY step
(skipped ones included); the first and last steps always compute; otherwise
``acc += poly(rel)`` and the step is skipped iff ``acc < threshold``, else computed with ``acc = 0``.
``poly`` is the model's degree-4 rescaling polynomial (highest power first, evaluated in float64 by
Horner's rule, no clamping: it may be negative). A skipped step returns stack input + the residual of
the last computed step.

Coefficients: the published ones come from ``assets/teacache_coefficients.json`` (keyed by model);
for other models fit them with ``stepcache calibrate --model ... --out FILE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from stepcache.core.actions import COMPUTE, REUSE
from stepcache.core.policy import Policy, PolicyConfig, register_policy
from stepcache.errors import ConfigError
from stepcache.policies.calibration_data import given_or_published, load_values, published_by_name
from stepcache.policies.indicators import rel_l1

TABLE = "teacache_coefficients.json"


@dataclass(frozen=True)
class TeaCache(PolicyConfig):
    """``TeaCache(threshold=0.4, coefficients=None)``.

    Args:
        threshold: largest accumulated rescaled change a skip may reach (FLUX: 0.25 / 0.4 / 0.6 / 0.8
            give about 1.5 / 1.8 / 2.0 / 2.25x).
        coefficients: the rescaling polynomial (highest power first), a published model name such as
            "flux", or the path of a ``stepcache calibrate`` file; None uses the published ones for
            the model when they exist.
    """

    threshold: float = 0.4
    coefficients: tuple[float, ...] | str | None = None
    method: ClassVar[str] = "teacache"

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or self.threshold <= 0:
            raise ConfigError(f"TeaCache threshold must be a number > 0, got {self.threshold!r}.")
        c = self.coefficients
        if c is None:
            return
        if isinstance(c, str) and not c.endswith(".json"):
            c = published_by_name(TABLE, "coefficients", c)
        else:
            c = load_values(c, "teacache_coefficients", "TeaCache coefficients")
        object.__setattr__(self, "coefficients", c)

    @classmethod
    def search_space(cls) -> dict:
        return {"threshold": [0.1, 0.25, 0.4, 0.6, 0.8]}


def resolve_coefficients(config: TeaCache, family: str, names: tuple[str, ...] = ()) -> tuple[float, ...]:
    """The config's coefficients, else the published ones for these weights or this model family, else a
    one-sentence fix."""
    return given_or_published(config.coefficients, TABLE, "coefficients", family,
                              "TeaCache has no rescaling coefficients",
                              "TeaCache(coefficients=FILE) (CLI: --coefficients FILE)", names)


def poly(coefficients: Sequence[float], x: float) -> float:
    """Horner's rule in float64, highest power first (numpy.poly1d's order and arithmetic)."""
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


class TeaState:
    """Indicator state of one call branch (cond / uncond): the previous input and the accumulator."""

    def __init__(self, slots: dict | None = None) -> None:
        self.slots = {} if slots is None else slots  # "prev": the last modulated input (counted memory)
        self.acc = 0.0
        self.rel: float | None = None

    @property
    def prev(self) -> torch.Tensor | None:
        return self.slots.get("prev")

    def step(self, s: int, num_steps: int, m: torch.Tensor, coefficients, threshold: float) -> bool:
        """Advance to step ``s`` with the modulated input ``m``; True iff the stack is skipped."""
        first, last = s == 0, s == num_steps - 1
        prev = self.prev
        self.rel = None if first or prev is None else rel_l1(prev, m)
        self.slots["prev"] = m
        if first or last or self.rel is None:
            self.acc = 0.0
            return False
        self.acc += poly(coefficients, self.rel)
        if self.acc < threshold:
            return True
        self.acc = 0.0
        return False


def replay(rels: Sequence[float], coefficients, threshold: float) -> list[int]:
    """Skipped steps for a run whose step s has indicator ``rels[s]`` (rels[0] unused)."""
    num_steps, acc, out = len(rels), 0.0, []
    for s in range(num_steps):
        if s == 0 or s == num_steps - 1:
            acc = 0.0
            continue
        acc += poly(coefficients, rels[s])
        if acc < threshold:
            out.append(s)
        else:
            acc = 0.0
    return out


@register_policy(TeaCache)
class TeaCachePolicy(Policy):
    """One span over the whole stack, decided from the adapter's ``modulated_input`` probe."""

    def __init__(self, config: TeaCache, info):
        super().__init__(config, info)
        if "modulated_input" not in info.capabilities:
            raise ConfigError(f"TeaCache needs the first block's modulated input, which the {info.family} adapter "
                              "does not provide; use FBCache or MagCache on this model.")
        self.coefficients = resolve_coefficients(config, info.family, info.names)  # fails at apply time

    def new_call_state(self):
        return TeaState()

    def spans(self):
        return ((0, self.info.depth),)

    def decide(self, ctx, site, view):
        if not site.is_span:
            return COMPUTE
        self.state.slots = view.memory
        m = view.probe("modulated_input")  # (B, T, D)
        skip = self.state.step(ctx.progress, ctx.num_steps, m, self.coefficients, self.config.threshold)
        return REUSE if skip and view.cached is not None else COMPUTE
