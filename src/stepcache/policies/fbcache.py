"""First-Block Cache (ParaAttention's "first block cache"; the decisions of diffusers 0.42.1
``FirstBlockCacheConfig``): the first block always runs, and its residual says whether the rest
of the stack must.

r_s = block 0 output - block 0 input (hidden stream). With r_ref the residual of the last COMPUTED
step, ``d = mean|r_ref - r_s| / mean|r_ref|`` (model dtype). The step computes iff no r_ref exists
or ``d > threshold`` (equality skips); computing refreshes r_ref and the stored residual of blocks
1..L-1 (their output - block 0's output). A skipped step returns block 0's fresh output + that
stored residual. No warm-up, no limits. State is kept per call branch (cond / uncond).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from stepcache.core.actions import COMPUTE, REUSE
from stepcache.core.policy import Policy, PolicyConfig, register_policy
from stepcache.errors import ConfigError
from stepcache.policies.indicators import rel_l1


@dataclass(frozen=True)
class FBCache(PolicyConfig):
    """``FBCache(threshold=0.05)``: skip blocks 1..L-1 while block 0's residual moves less than
    ``threshold`` (relative L1) from the last computed step's."""

    threshold: float = 0.05
    method: ClassVar[str] = "fbcache"

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or self.threshold <= 0:
            raise ConfigError(f"FBCache threshold must be a number > 0, got {self.threshold!r}.")

    @classmethod
    def search_space(cls) -> dict:
        return {"threshold": [0.02, 0.05, 0.1, 0.2]}


def check_depth(depth: int, what: str = "FBCache") -> None:
    if depth < 2:
        raise ConfigError(f"{what} needs a model with at least 2 blocks (the first one decides for the rest), "
                          f"got depth {depth}.")


class FirstBlockState:
    """Indicator state of one call branch: the first block's residual at the last computed step
    (kept in ``slots["ref"]``, the runtime's counted memory), the fresh one, and the last diff."""

    def __init__(self, slots: dict | None = None) -> None:
        self.slots = {} if slots is None else slots
        self.fresh: torch.Tensor | None = None
        self.diff: float | None = None

    @property
    def ref(self) -> torch.Tensor | None:
        return self.slots.get("ref")

    def should_compute(self, residual: torch.Tensor, threshold: float) -> bool:
        """Decide for the rest of the stack given block 0's fresh residual; refresh on compute."""
        ref = self.ref
        self.diff = None if ref is None else rel_l1(ref, residual)
        compute = self.diff is None or self.diff > threshold
        if compute:
            self.slots["ref"] = residual
        return compute


def hidden_part(residual: torch.Tensor, info) -> torch.Tensor:
    """The hidden (image) stream of a span residual: two-stream blocks give [image; text] on dim 1."""
    T = info.num_tokens
    return residual if residual.shape[1] == T else residual[:, :T]


@register_policy(FBCache)
class FBCachePolicy(Policy):
    """Spans (0, 1) (block 0, always computed: its residual is the indicator) and (1, L) (the rest)."""

    def __init__(self, config: FBCache, info):
        super().__init__(config, info)
        check_depth(info.depth)

    def new_call_state(self):
        return FirstBlockState()

    def spans(self):
        return ((0, 1), (1, self.info.depth))

    def decide(self, ctx, site, view):
        if not site.is_span or site.layer == 0:
            return COMPUTE
        self.state.slots = view.memory
        compute = self.state.should_compute(self.state.fresh, self.config.threshold) or view.cached is None
        return COMPUTE if compute else REUSE

    def observe(self, ctx, site, result) -> None:
        if site.is_span and site.layer == 0:
            self.state.fresh = hidden_part(result.output, self.info)  # (B, T, D)
