"""DBCache: Dual Block Cache (cache-dit 1.5.3 ``DBCacheConfig``) on the sampler's clock.

The first ``front`` blocks (Fn) always run; their residual r = Fn output - call input is compared
with the one of the last computed step. When the rules below allow it, the middle blocks
Mn = B[front : L-back] are replaced by their residual stored at the last computed step (or, with
``forecast=TaylorSeer(order=k)``, by a Taylor forecast of that residual); the last ``back`` blocks
(Bn) always run and refine the approximation. Rules, in cache-dit's order (the first that fails
computes the step):

1. warm-up: ``s in range(0, warmup, warmup_interval)`` (nothing recorded);
2. ``max_cached_steps`` >= 0 and the cached steps of this run reached it;
3. ``max_continuous_cached_steps`` >= 0 and the current streak reached it (a computed step resets it);
4. ``max_accumulated_diff`` set and the sum of the positive diffs recorded this run reached it;
5. no Fn residual stored yet;
6. ``threshold >= 1``: always cache (records -1.0); a shape change: compute (records -2.0);
7. ``d = mean|r_ref - r| / mean|r_ref|`` (model dtype) recorded; cache iff ``d < threshold`` (strict).

The Fn reference residual is refreshed only on computed steps, so d is the drift since the last
refresh. Differences from cache-dit, by design: the step is the sampler's index (cache-dit counts
calls, so CFG pairs or multi-stage solvers shift its warm-up and limits); state is kept per call
branch (cond / uncond) always; ``front + back <= depth`` is enforced (cache-dit accepts overlaps
and runs blocks twice); the forecast takes differences at computed steps ``s >= forecast.warmup - 1``
(TaylorSeer's own rule; the default warm-up 2 differences from the second step on). cache-dit's
calibrator starts late (no difference before step 3): ``forecast=TaylorSeer(order=1, warmup=4)``
reproduces it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from stepcache.core.actions import COMPUTE, REUSE, Emit
from stepcache.core.policy import Policy, PolicyConfig, register_policy
from stepcache.errors import ConfigError
from stepcache.policies.fbcache import hidden_part
from stepcache.policies.indicators import rel_l1
from stepcache.policies.taylorseer import FACTOR_DTYPES, TaylorSeer, TaylorSeries, forecast_macs


def _int(v, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


@dataclass(frozen=True)
class DBCache(PolicyConfig):
    """``DBCache(front=8, back=0, threshold=0.08, warmup=8, ...)`` (cache-dit's F8B0 defaults).

    Args:
        front / back: blocks always computed at the start (>= 1) and the end (>= 0) of the stack.
        threshold: cache while the front residual's relative L1 drift is below it (>= 1: always).
        warmup, warmup_interval: steps ``range(0, warmup, warmup_interval)`` always compute.
        max_cached_steps, max_continuous_cached_steps: limits per run (-1: none).
        max_accumulated_diff: stop caching once the recorded diffs sum to this (None: no cap).
        forecast: ``TaylorSeer(order=k)`` forecasts the middle residual instead of reusing it
            (its ``order``, ``factors_dtype`` and ``warmup`` (differences from step warmup-1) are used;
            DBCache decides the steps).
    """

    front: int = 8
    back: int = 0
    threshold: float = 0.08
    warmup: int = 8
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    max_accumulated_diff: float | None = None
    forecast: TaylorSeer | None = None
    method: ClassVar[str] = "dbcache"

    def __post_init__(self) -> None:
        if not _int(self.front, 1):
            raise ConfigError(f"DBCache front must be an integer >= 1 (the blocks that decide), got {self.front!r}.")
        if not _int(self.back, 0):
            raise ConfigError(f"DBCache back must be an integer >= 0, got {self.back!r}.")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or self.threshold <= 0:
            raise ConfigError(f"DBCache threshold must be a number > 0, got {self.threshold!r}.")
        if not _int(self.warmup, 0) or not _int(self.warmup_interval, 1):
            raise ConfigError(f"DBCache warmup must be >= 0 and warmup_interval >= 1 (integers), got "
                              f"{self.warmup!r} and {self.warmup_interval!r}.")
        for name in ("max_cached_steps", "max_continuous_cached_steps"):
            if not _int(getattr(self, name), -1):
                raise ConfigError(f"DBCache {name} must be an integer >= 0, or -1 for no limit.")
        if self.max_accumulated_diff is not None and (isinstance(self.max_accumulated_diff, bool) or not isinstance(
                self.max_accumulated_diff, (int, float)) or self.max_accumulated_diff <= 0):
            raise ConfigError(f"DBCache max_accumulated_diff must be a number > 0 or None, "
                              f"got {self.max_accumulated_diff!r}.")
        fc = self.forecast
        if isinstance(fc, dict):  # from to_dict()
            fc = TaylorSeer(**{k: v for k, v in fc.items() if k != "method"})
            object.__setattr__(self, "forecast", fc)
        if fc is not None and not isinstance(fc, TaylorSeer):
            raise ConfigError(f"DBCache forecast must be TaylorSeer(order=k) or None, got {fc!r}.")

    @classmethod
    def search_space(cls) -> dict:
        return {"front": [1, 2, 4, 8], "back": [0, 2, 4], "threshold": [0.04, 0.08, 0.12, 0.2], "warmup": [2, 4, 8]}

    def check_depth(self, depth: int) -> None:
        if self.front + self.back > depth - 1:
            raise ConfigError(f"DBCache front + back must leave at least one middle block to cache: "
                              f"front={self.front} + back={self.back} on a {depth}-block model; lower them.")

    def tag(self) -> str:
        """cache-dit's summary tag, e.g. ``DBCache_F8B0_W8I1M0MC0_R0.08``."""
        return (f"DBCache_F{self.front}B{self.back}_W{self.warmup}I{self.warmup_interval}"
                f"M{max(0, self.max_cached_steps)}MC{max(0, self.max_continuous_cached_steps)}_R{self.threshold}")


class DualBlockState:
    """Decision state of one call branch (cond / uncond) for one run."""

    def __init__(self, config: DBCache, slots: dict | None = None) -> None:
        self.config = config
        self.slots = {} if slots is None else slots  # "ref": Fn residual of the last computed step
        self.fresh: torch.Tensor | None = None  # this call's Fn residual
        self.cached: list[int] = []
        self.diffs: dict[int, float] = {}
        self.streak = 0
        self.accumulated = 0.0
        self.series: TaylorSeries | None = None
        if config.forecast is not None:
            self.series = TaylorSeries(config.forecast.order, FACTOR_DTYPES[config.forecast.factors_dtype],
                                       rules="diffusers", differences_from=config.forecast.warmup - 1)

    @property
    def ref(self) -> torch.Tensor | None:
        return self.slots.get("ref")

    def _record(self, s: int, d: float) -> None:
        if s not in self.diffs:
            self.diffs[s] = d
            if d > 0:
                self.accumulated += d

    def can_cache(self, s: int, residual: torch.Tensor) -> bool:
        """cache-dit's rules in order, for step ``s`` with the front blocks' fresh residual."""
        c = self.config
        if not self.cached or self.cached[-1] != s - 1:
            self.streak = 0  # a computed step breaks the streak
        if s in range(0, c.warmup, c.warmup_interval):
            return False
        if 0 <= c.max_cached_steps <= len(self.cached):
            return False
        if 0 <= c.max_continuous_cached_steps <= self.streak:
            return False
        if c.max_accumulated_diff is not None and self.accumulated >= c.max_accumulated_diff:
            return False
        ref = self.ref
        if ref is None:
            return False
        if c.threshold >= 1:
            self._record(s, -1.0)
            return True
        if ref.shape != residual.shape:
            self._record(s, -2.0)
            return False
        d = rel_l1(ref, residual)
        self._record(s, d)
        return d < c.threshold

    def decide(self, s: int, residual: torch.Tensor) -> bool:
        """True iff step ``s`` caches the middle blocks; a computed step refreshes the reference."""
        cache = self.can_cache(s, residual)
        if cache:
            self.cached.append(s)
            self.streak += 1
        else:
            self.slots["ref"] = residual
        return cache


@register_policy(DBCache)
class DBCachePolicy(Policy):
    """Spans (0, front) (always computed; its residual is the indicator) and (front, L - back)."""

    def __init__(self, config: DBCache, info):
        super().__init__(config, info)
        config.check_depth(info.depth)
        self.middle = (config.front, info.depth - config.back)

    def new_call_state(self):
        return DualBlockState(self.config)

    def spans(self):
        return ((0, self.config.front), self.middle)

    def decide(self, ctx, site, view):
        if not site.is_span or site.layer == 0:
            return COMPUTE
        state = self.state
        state.slots = view.memory
        if not state.decide(ctx.progress, state.fresh) or view.cached is None:
            return COMPUTE
        if state.series is None:
            return REUSE
        factors = state.series.factors
        return Emit(state.series.predict(ctx.progress, view.cached.dtype), macs=forecast_macs(factors))

    def observe(self, ctx, site, result) -> None:
        if not site.is_span:
            return
        if site.layer == 0:
            self.state.fresh = hidden_part(result.output, self.info)  # (B, T, D)
        elif self.state.series is not None:
            self.state.series.update(result.output, ctx.progress)
            result.memory["F"] = self.state.series.factors  # counted as the policy's memory
