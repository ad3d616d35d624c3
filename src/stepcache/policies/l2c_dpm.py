"""Learning-to-Cache on DPM-Solver++(2S) runs: the schedule of the paper's U-ViT routers (dpm20, dpm50).

A run of N solver steps makes 2N model evaluations: step j evaluates at its start (stage 0) and at its
midpoint (stage 1). Every midpoint, and the start of step 0, is computed in full. The start of step
j >= 1 is a cache step: it reuses the branch outputs of the evaluation just before it (the midpoint of
step j - 1) and reads router row j; a unit (entry 2l: block l's attention, 2l + 1: its MLP) is
recomputed iff ``sigmoid(logit) > threshold`` (strict). The router file holds one row per model
evaluation (2N rows, as the reference saves them) of which only rows 1..N-1 are ever read.

The reference finds cache steps by counting model calls and its router row by rounding the float
timestep into a table; here both come from the sampler's clock (step j, stage), so a run without
guidance, an extra model call or a new batch cannot shift the schedule.
"""

from __future__ import annotations

import torch

from stepcache.errors import ModelMismatchError
from stepcache.core.actions import COMPUTE, REUSE

BRANCH_OFFSET = {"attn": 0, "mlp": 1}


def staged_cache_steps(num_steps: int) -> list[int]:
    """Solver steps j whose start is a cache step: 1 .. N-1."""
    return list(range(1, num_steps))


def staged_recompute_mask(logits: torch.Tensor, threshold: float, num_steps: int) -> torch.Tensor:
    """(2N, U) logits -> bool (N, U): True where the start of step j recomputes unit u (row 0: all)."""
    keep = torch.sigmoid(logits[:num_steps].float()) > threshold  # (N, U)
    keep[0] = True
    return keep


def staged_active_units(logits: torch.Tensor, threshold: float) -> dict:
    """Units recomputed over the cache steps of a 2N-row router, counted as the reference's load_ranking."""
    num_steps = logits.shape[0] // 2
    rows = staged_cache_steps(num_steps)
    keep = staged_recompute_mask(logits, threshold, num_steps)[rows]  # (N-1, U)
    total, active = keep.numel(), int(keep.sum())
    return {"total": total, "active": active,
            "attn_active": int(keep[:, 0::2].sum()), "mlp_active": int(keep[:, 1::2].sum()),
            "attn_total": total // 2, "mlp_total": total // 2,
            "skipped_share": 1.0 - active / total if total else 0.0,
            "per_step": {j: int(k.sum()) for j, k in zip(rows, keep)}}


class StagedRouter:
    """The decisions of one L2C config over one two-stage run (built by ``L2CHandler.reset``)."""

    def __init__(self, config, run):
        if config.num_steps != 2 * run.num_steps:
            raise ModelMismatchError(
                f"The L2C router has {config.num_steps} rows (one per model evaluation) but this "
                f"DPM-Solver++(2S) run makes {2 * run.num_steps} evaluations ({run.num_steps} steps).")
        self.keep = staged_recompute_mask(config.logits(), config.threshold, run.num_steps).tolist()  # [N][U]

    def decide(self, ctx, layer: int, branch: str):
        offset = BRANCH_OFFSET.get(branch)
        if offset is None or ctx.stage != 0:  # midpoints are full; unrouted branches always compute
            return COMPUTE
        return COMPUTE if self.keep[ctx.progress][2 * layer + offset] else REUSE
