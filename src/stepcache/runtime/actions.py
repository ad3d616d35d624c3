"""What a policy may tell the runtime to do with one branch (site) at one step."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Compute:
    """Run the branch on every token and refresh its cache."""

    need_map: bool = False  # also produce the attention map (explicit softmax) for scoring
    need_values: bool = False  # also produce per-head value norms (B, H, T); attention stays fused (SDPA)

    kind = "compute"


@dataclass(frozen=True)
class Reuse:
    """Skip the branch; reuse its cached (un-gated) output."""

    kind = "reuse"


@dataclass(frozen=True)
class Partial:
    """Recompute only the tokens ``index`` (rows, k) and write them into the cache."""

    index: torch.Tensor  # (B, k) int64, per batch row
    need_map: bool = False  # also produce the attention map of those k queries, (B, k, L), for scoring

    kind = "partial"


@dataclass(frozen=True)
class Blend:
    """Differentiable mix for router training: out = w * fresh + (1 - w) * cached."""

    weight: torch.Tensor  # scalar tensor

    kind = "blend"


COMPUTE = Compute()
COMPUTE_WITH_MAP = Compute(need_map=True)
REUSE = Reuse()
