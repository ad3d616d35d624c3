"""Cheap change indicators shared by the dynamic policies (FBCache, DBCache, TeaCache)."""

from __future__ import annotations

import torch


def rel_l1(prev: torch.Tensor, cur: torch.Tensor) -> float:
    """mean|prev - cur| / mean|prev| over ALL elements (CFG halves included), in the tensors' dtype.

    The peers evaluate it in the model dtype (a bf16 model gives a bf16-rounded ratio) and compare
    the Python float; doing the same keeps their decisions. One host sync, kept in this function.
    """
    return ((prev - cur).abs().mean() / prev.abs().mean()).item()


def rel_l1_macs(t: torch.Tensor) -> int:
    """Work of one rel-L1: a subtraction and two absolute sums per element."""
    return 2 * t.numel()
