"""Forecast: compute every block on a schedule of full steps, forecast every branch in between by
polynomial extrapolation through its last computed values, at their true step positions.

stepcache's own method. Like TaylorSeer (Liu et al., arXiv 2503.06923) it replaces the attention
and MLP outputs of skipped steps by a forecast from the last full steps, but

- the forecast is the exact interpolating polynomial through the last ``order + 1`` computed values
  at their real step positions (Newton's divided differences, updated at each full step, evaluated by
  Horner's rule in ``order`` fused passes): TaylorSeer's reference divides every order by the latest
  spacing only, which is exact for order 1 on a uniform grid but biased where spacings differ (after
  the warm-up, or on any non-uniform schedule);
- the full steps are a free schedule: a spaced one (``num_full`` steps, denser towards the end for
  ``power > 1``: on the embedded DiT the last steps, which settle the fine detail, gain most), or
  one learned for a model with :func:`stepcache.training.forecast_schedule.learn_schedule` (end-to-end
  fidelity on calibration seeds) and given as ``full_steps``.

Steps are counted as ``s = ctx.progress`` (0 = the first step). The forecast costs ``order``
multiply-adds per element, counted as the policy's work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from stepcache.core.actions import COMPUTE, Emit
from stepcache.core.policy import Policy, PolicyConfig, register_policy
from stepcache.errors import ConfigError, ModelMismatchError


SCOPES = ("branches", "stack")
SCHEDULES_FILE = Path(__file__).resolve().parents[1] / "assets" / "forecast_schedules.json"


def _learned_entry(name: str) -> dict:
    table = json.loads(SCHEDULES_FILE.read_text())["schedules"] if SCHEDULES_FILE.is_file() else {}
    if name not in table:
        raise ConfigError(f"No learned Forecast schedule {name!r}; shipped: {', '.join(sorted(table)) or 'none'}.")
    return table[name]


def learned_schedule(name: str) -> "Forecast":
    """A shipped learned schedule by name (``scripts/learn_forecast_schedules.py`` writes them), e.g.
    ``learned_schedule("embedded-ddim50-cfg4-K15")``, with the order it was learned for."""
    return Forecast(learned=name, order=_learned_entry(name)["order"])


def spaced_schedule(num_steps: int, num_full: int, power: float) -> tuple[int, ...]:
    """``num_full`` full steps in 0..S-1: 0 and 1 (two values to extrapolate from), then
    ``round((S-1) (1 - (1 - j / (K-1)) ** power))``: power 1 uniform, > 1 denser towards the end."""
    S, K = num_steps, min(num_full, num_steps)
    if K <= 2:
        return tuple(range(K))
    steps = {0, 1} | {round((S - 1) * (1 - (1 - j / (K - 1)) ** power)) for j in range(K)}
    steps = sorted(steps)
    while len(steps) < K:  # rounding merged some: split the widest gap
        gaps = [(b - a, a) for a, b in zip(steps, steps[1:])]
        width, start = max(gaps)
        steps = sorted(steps + [start + width // 2])
    while len(steps) > K:  # drop the step closest to a neighbour (never 0 or 1)
        _, k = min((steps[k + 1] - steps[k - 1], k) for k in range(2, len(steps) - 1))
        del steps[k]
    return tuple(steps)


@dataclass(frozen=True)
class Forecast(PolicyConfig):
    """``Forecast(num_full=15, power=2.0, order=2)`` or ``Forecast(full_steps=(0, 1, ...), num_steps=50)``.

    full_steps: explicit full steps (steps taken: 0 = first), e.g. a learned schedule; it fixes
        ``num_steps``, the step count it was made for. Empty: the spaced schedule below.
    learned: the name of a shipped learned schedule (``assets/forecast_schedules.json``), e.g.
        ``"embedded-ddim50-cfg4-K15"``; fills ``full_steps`` and ``num_steps``.
    num_full / power: the spaced schedule of ``num_full`` full steps (power 1 uniform, > 1 denser late).
    order: degree of the extrapolating polynomial (1 linear, 2 quadratic, ...).
    scope: ``"branches"`` forecasts each block's attention and MLP outputs (gated by the current step's
        adaLN, as TaylorSeer does); ``"stack"`` forecasts the residual of the whole block stack as one
        tensor: the blocks are not entered on forecast steps (fewer memory passes, a little less faithful).
    """

    full_steps: tuple = ()
    num_steps: int | None = None
    learned: str | None = None
    num_full: int = 15
    power: float = 2.0
    order: int = 2
    scope: str = "branches"
    method: ClassVar[str] = "forecast"

    def __post_init__(self) -> None:
        if self.learned is not None and not self.full_steps:  # a shipped learned schedule, by name
            entry = _learned_entry(self.learned)
            object.__setattr__(self, "full_steps", tuple(entry["full_steps"]))
            object.__setattr__(self, "num_steps", entry["num_steps"])
        object.__setattr__(self, "full_steps", tuple(int(s) for s in self.full_steps))
        steps = self.full_steps
        if steps and (steps[0] != 0 or list(steps) != sorted(set(steps))):
            raise ConfigError("Forecast full_steps must be increasing step numbers starting at 0 (the first step "
                              "has nothing to forecast from).")
        if steps and self.num_steps is None:
            raise ConfigError("Forecast full_steps need num_steps, the step count the schedule was made for.")
        if steps and steps[-1] >= self.num_steps:
            raise ConfigError(f"Forecast full step {steps[-1]} lies outside a {self.num_steps}-step run.")
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 0:
            raise ConfigError(f"Forecast order must be an integer >= 0, got {self.order!r}.")
        if isinstance(self.num_full, bool) or not isinstance(self.num_full, int) or self.num_full < 1:
            raise ConfigError(f"Forecast num_full must be an integer >= 1, got {self.num_full!r}.")
        if self.scope not in SCOPES:
            raise ConfigError(f"Forecast scope must be one of {', '.join(SCOPES)}, got {self.scope!r}.")
        if not isinstance(self.power, (int, float)) or not 0 < self.power <= 4:
            raise ConfigError(f"Forecast power must lie in (0, 4], got {self.power!r}.")

    def schedule(self, num_steps: int) -> tuple[int, ...]:
        if self.full_steps:
            if num_steps != self.num_steps:
                raise ModelMismatchError(f"This Forecast schedule was made for {self.num_steps} steps, "
                                         f"not {num_steps}.")
            return self.full_steps
        return spaced_schedule(num_steps, self.num_full, self.power)

    @classmethod
    def search_space(cls) -> dict[str, list]:
        return {"num_full": [10, 12, 15, 18, 22], "power": [1.5, 2.0, 2.5], "order": [1, 2],
                "scope": list(SCOPES)}


def lagrange_weights(points: list[int], s: int) -> list[float]:
    """Weights w_j with sum_j w_j f(points[j]) = p(s), p the polynomial through the points (for reading
    what a forecast weighs; the policy itself evaluates the same polynomial in Newton form)."""
    weights = []
    for j, sj in enumerate(points):
        w = 1.0
        for m, sm in enumerate(points):
            if m != j:
                w *= (s - sm) / (sj - sm)
        weights.append(w)
    return weights


def newton_update(coeffs: list, nodes: list[int], value, s: int, order: int, *,
                  recycle: bool = False) -> tuple[list, list[int]]:
    """Divided differences with the new value first: ``coeffs[j] = f[s, z_0, ..., z_{j-1}]`` over the nodes
    (most recent first), from the previous ones in ``order`` subtractions and divisions, each by its true
    spacing ``s - z_{j-1}`` (TaylorSeer's reference divides every order by the latest spacing only).

    ``recycle``: each new difference is written into the buffer of an old coefficient that nothing needs
    after it (coefficient j into the old j-1 for j >= 2, read by the same subtraction; coefficient 1 into
    the dropped top one), so a refresh allocates nothing; the old coefficients are consumed. Same bits.
    """
    new = [value]
    top = min(order, len(coeffs))
    for j in range(1, top + 1):
        buf = coeffs[j - 1] if j >= 2 else coeffs[top] if len(coeffs) > top >= 1 else None
        if not recycle or buf is None or buf.shape != value.shape or buf.dtype != value.dtype:
            new.append((new[j - 1] - coeffs[j - 1]) / (s - nodes[j - 1]))
        else:
            new.append(torch.sub(new[j - 1], coeffs[j - 1], out=buf).div_(s - nodes[j - 1]))
    return new, [s] + nodes[: len(new) - 1]


def newton_eval(coeffs: list, nodes: list[int], s: int):
    """The polynomial at s by Horner's rule, one fused multiply-add pass per order, in place in the one
    new tensor (the output; order 0 returns the value itself)."""
    if len(coeffs) == 1:
        return coeffs[0]
    out = torch.add(coeffs[-2], coeffs[-1], alpha=s - nodes[-2])
    for j in range(len(coeffs) - 3, -1, -1):
        torch.add(coeffs[j], out, alpha=s - nodes[j], out=out)
    return out


@register_policy(Forecast)
class ForecastPolicy(Policy):
    """Per branch site, ``slots["D"]``/``slots["z"]``: the Newton coefficients and nodes of the last
    ``order + 1`` computed outputs (as many tensors as TaylorSeer keeps)."""

    def spans(self):
        return ((0, self.info.depth),) if self.config.scope == "stack" else ()

    def reset(self, run) -> None:
        super().reset(run)
        self.full = frozenset(self.config.schedule(run.num_steps))

    def _forecasts(self, site) -> bool:
        return site.is_span == (self.config.scope == "stack")

    def decide(self, ctx, site, view):
        s = ctx.progress
        if not self._forecasts(site) or s in self.full:
            return COMPUTE
        slots = view.memory
        coeffs = slots.get("D")
        if not coeffs:
            raise ConfigError(f"Forecast has nothing to extrapolate {site} from at step {ctx.i}.")
        return Emit(newton_eval(coeffs, slots["z"], s), macs=coeffs[0].numel() * (len(coeffs) - 1))

    def observe(self, ctx, site, result) -> None:
        s = ctx.progress
        if not self._forecasts(site) or s not in self.full:
            return
        slots = result.memory
        nodes = slots.get("z", [])
        if nodes and nodes[0] == s:  # a second solver stage of the same step: its first value stands
            return
        slots["D"], slots["z"] = newton_update(slots.get("D", []), nodes, result.output, s, self.config.order,
                                               recycle=True)
