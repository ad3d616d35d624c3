"""MagCache: skip the whole block stack while the accumulated magnitude-ratio error stays small
(Ma et al., "MagCache: Fast Video Generation with Magnitude-Aware Cache", arXiv 2506.09045), with
the decisions of diffusers 0.42.1 ``MagCacheConfig``.

The stack residual R_s = stack output - stack input changes in norm by a model-specific ratio
``mag_ratios[s] ~ ||R_s|| / ||R_{s-1}||`` (recorded once by ``stepcache calibrate``). After the
first ``int(retention_ratio * S + 0.5)`` steps, each step multiplies the ratio in, counts the step
and adds ``|1 - ratio|`` to the error; the step is skipped iff a residual is stored, the error is
<= threshold and at most ``max_skip_steps`` were skipped in a row; otherwise it is computed and the
accumulators restart. A skipped step returns stack input + the last computed R (not rescaled).
The rule never looks at the data, so the skipped steps are a function of the ratios alone.

Differences from the peer (cleaner, same decisions when the peer is configured for the real S):
the clock is the sampler's step index (diffusers counts calls and wraps at its configured
``num_inference_steps``), and ``mag_ratios`` are interpolated to the run's step count at reset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from stepcache.core.actions import COMPUTE, REUSE
from stepcache.core.policy import Policy, PolicyConfig, register_policy
from stepcache.errors import ConfigError
from stepcache.policies.calibration_data import given_or_published, load_values, published_by_name

TABLE = "magcache_ratios.json"


@dataclass(frozen=True)
class MagCache(PolicyConfig):
    """``MagCache(threshold=0.06, max_skip_steps=3, retention_ratio=0.2, mag_ratios=None)``.

    Args:
        threshold: largest accumulated error ``sum |1 - prod ratios|`` a skip may reach.
        max_skip_steps: most steps skipped in a row (K).
        retention_ratio: the first ``int(retention_ratio * S + 0.5)`` steps are always computed.
        mag_ratios: the model's magnitude ratios (a list, a published table's name such as "flux" or
            "embedded-ddim50", or the path of a ``stepcache calibrate`` file); None uses the published
            table for the model when one exists (FLUX).
    """

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    mag_ratios: tuple[float, ...] | str | None = None
    method: ClassVar[str] = "magcache"

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or self.threshold <= 0:
            raise ConfigError(f"MagCache threshold must be a number > 0, got {self.threshold!r}.")
        if isinstance(self.max_skip_steps, bool) or not isinstance(self.max_skip_steps, int) \
                or self.max_skip_steps < 1:
            raise ConfigError(f"MagCache max_skip_steps must be an integer >= 1, got {self.max_skip_steps!r}.")
        if isinstance(self.retention_ratio, bool) or not isinstance(self.retention_ratio, (int, float)) \
                or not 0 <= self.retention_ratio <= 1:
            raise ConfigError(f"MagCache retention_ratio must be in [0, 1], got {self.retention_ratio!r}.")
        if self.mag_ratios is not None:
            source = self.mag_ratios
            if isinstance(source, str) and not source.endswith(".json"):  # a published table's name
                source = published_by_name(TABLE, "mag_ratios", source)
            ratios = load_values(source, "mag_ratios", "MagCache mag_ratios")
            if any(not r > 0 for r in ratios):
                raise ConfigError("MagCache mag_ratios must all be > 0; record them again with `stepcache calibrate`.")
            object.__setattr__(self, "mag_ratios", ratios)

    @classmethod
    def search_space(cls) -> dict:
        return {"threshold": [0.03, 0.06, 0.12, 0.24], "max_skip_steps": [2, 3, 4], "retention_ratio": [0.1, 0.2]}


def resolve_ratios(config: MagCache, family: str, names: tuple[str, ...] = ()) -> tuple[float, ...]:
    """The config's ratios, else the published ones for these weights or this model family, else a
    one-sentence fix."""
    return given_or_published(config.mag_ratios, TABLE, "mag_ratios", family, "MagCache has no magnitude ratios",
                              "MagCache(mag_ratios=FILE) (CLI: --mag-ratios FILE)", names)


def interpolate_ratios(ratios, num_steps: int) -> torch.Tensor:
    """Nearest interpolation to ``num_steps`` entries (float32 grid, round half to even), float32."""
    src = torch.as_tensor(ratios, dtype=torch.float32)  # (L,)
    if len(src) == num_steps:
        return src
    if num_steps == 1:
        return src[-1:]
    scale = (len(src) - 1) / (num_steps - 1)
    index = torch.round(torch.arange(num_steps, dtype=torch.float32) * scale).long()  # (S,)
    return src[index]


def retention_steps(retention_ratio: float, num_steps: int) -> int:
    return int(retention_ratio * num_steps + 0.5)


class MagState:
    """Accumulators of one call branch (cond / uncond). float32 scalars, as the peer keeps them."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.ratio = torch.tensor(1.0)
        self.skipped = 0
        self.err = torch.tensor(0.0)

    def step(self, s: int, ratios: torch.Tensor, retain: int, threshold: float, max_skip: int,
             has_residual: bool) -> bool:
        """Advance to step ``s``; True iff the stack is skipped."""
        if s < retain:
            return False
        scale = ratios[s] if s < len(ratios) else torch.tensor(1.0)
        self.ratio = self.ratio * scale
        self.skipped += 1
        self.err = self.err + (1.0 - self.ratio).abs()
        if has_residual and bool(self.err <= threshold) and self.skipped <= max_skip:
            return True
        self.restart()
        return False


def skipped_steps(config: MagCache, num_steps: int, ratios=None) -> list[int]:
    """Replay the rule over a run (the first step computes, so a residual exists from then on)."""
    table = interpolate_ratios(ratios if ratios is not None else config.mag_ratios, num_steps)
    state, retain, out = MagState(), retention_steps(config.retention_ratio, num_steps), []
    for s in range(num_steps):
        if state.step(s, table, retain, config.threshold, config.max_skip_steps, has_residual=s > 0):
            out.append(s)
    return out


@register_policy(MagCache)
class MagCachePolicy(Policy):
    """One span over the whole stack; the runtime stores its residual on computed steps."""

    def __init__(self, config: MagCache, info):
        super().__init__(config, info)
        self.ratios = resolve_ratios(config, info.family, info.names)  # fails at apply time, not mid-run
        self.table = interpolate_ratios(self.ratios, len(self.ratios))
        self.retain = 0

    def new_call_state(self):
        return MagState()

    def reset(self, run) -> None:
        super().reset(run)
        self.table = interpolate_ratios(self.ratios, run.num_steps)  # (S,) float32
        self.retain = retention_steps(self.config.retention_ratio, run.num_steps)

    def spans(self):
        return ((0, self.info.depth),)

    def decide(self, ctx, site, view):
        if not site.is_span:
            return COMPUTE
        c = self.config
        skip = self.state.step(ctx.progress, self.table, self.retain, c.threshold, c.max_skip_steps,
                               has_residual=view.cached is not None)
        return REUSE if skip else COMPUTE
