"""FORA: static caching (Selvaraju et al., "FORA: Fast-Forward Caching in Diffusion Transformer
Acceleration", arXiv 2407.01425).

Every block's un-gated attention and MLP outputs are recomputed at refresh steps and reused in
between; gates, embeddings and the final layer run at every step. With ``i`` counting down from
``S-1``, a step refreshes iff ``i == S-1`` or ``i % N == 0`` (phase anchored at the last step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from stepcache.errors import ConfigError
from stepcache.core.policy import Policy, PolicyConfig, register_policy
from stepcache.core.actions import COMPUTE, REUSE


@dataclass(frozen=True)
class FORA(PolicyConfig):
    """``FORA(interval=N)``: refresh every N steps; ``interval=1`` is exactly no cache."""

    interval: int = 3
    method: ClassVar[str] = "fora"

    @classmethod
    def search_space(cls) -> dict[str, list]:
        return {"interval": [2, 3, 4, 5, 6]}

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ConfigError(f"FORA interval must be an integer >= 1, got {self.interval!r}.")


def fora_refresh(i: int, num_steps: int, interval: int) -> bool:
    return i == num_steps - 1 or i % interval == 0


@register_policy(FORA)
class ForaPolicy(Policy):
    def decide(self, ctx, site, view):
        return COMPUTE if fora_refresh(ctx.i, ctx.num_steps, self.config.interval) else REUSE
