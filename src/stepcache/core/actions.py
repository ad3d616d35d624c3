"""What a policy may tell the runtime to do with one site at one model call."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Compute:
    """Run the site on every token and refresh its cache."""

    need_map: bool = False  # also produce the attention map (explicit softmax) for scoring
    need_values: bool = False  # also produce per-head value norms (B, H, T); attention stays fused (SDPA)

    kind = "compute"


@dataclass(frozen=True)
class Reuse:
    """Skip the site; reuse its cached output (a branch's un-gated output, a span's residual)."""

    kind = "reuse"


@dataclass(frozen=True)
class Partial:
    """Recompute only the tokens ``index`` (rows, k) and write them into the cache."""

    index: torch.Tensor  # (B, k) int64, per batch row
    need_map: bool = False  # also produce the attention map of those k queries, (B, k, L), for scoring
    base: torch.Tensor | None = None  # the output the k tokens are written into (a forecast); None: the cache
    macs: int = 0  # the policy's work to make ``base``

    kind = "partial"


@dataclass(frozen=True)
class Blend:
    """Differentiable mix for router training: out = w * fresh + (1 - w) * cached."""

    weight: torch.Tensor  # scalar tensor

    kind = "blend"


@dataclass(frozen=True, eq=False)
class Emit:
    """Skip the site; its output is ``tensor``, supplied by the policy (a forecast). ``macs`` is the
    work the policy spent making it (counted as executed)."""

    tensor: torch.Tensor
    macs: int = 0

    kind = "emit"


COMPUTE = Compute()
COMPUTE_WITH_MAP = Compute(need_map=True)
COMPUTE_WITH_VALUES = Compute(need_values=True)
REUSE = Reuse()
