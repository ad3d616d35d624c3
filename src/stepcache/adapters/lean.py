"""Lean reuse steps for adaLN-gated blocks: less memory traffic where a branch is reused or forecast.

On a reuse step a block's branches do no multiply-adds, so what is left is memory-bound: the adaLN
linear (its weight is read whole to produce six chunks of which two gates are used), and the gated
residual adds ``x + gate * a``, each of which allocates a temporary and an output. On CPU a fresh
multi-MiB tensor costs page faults that can outweigh the arithmetic. Two helpers remove that work
without changing a bit of the result:

- :func:`adaln_chunks` computes only the chunks of the modulation that are used, from the matching
  rows of the weight (the same dot products, so the same values as slicing the full output);
- :func:`gated_add` forms ``gate * a`` in a reused scratch buffer, then adds it to ``x`` in place when
  nobody else holds ``x`` (else into one fresh tensor): the same two roundings as ``x + gate * a``.
  A fused ``addcmul`` is one pass fewer, but it rounds once (an FMA) and so changes the last bits of
  every reuse step, which would break the bit-exact parity with the reference FORA and the independent
  re-implementations in the tests: it is opt-in (``handle.lean = "fused"``).

Holding rules (who may see a residual-stream tensor) are the adapter's business; see
``stepcache.adapters.dit``.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn


def skips(action) -> bool:
    """Whether an action decided ahead (``handle.peek``) leaves the branch's input unused."""
    return action is not None and action.kind in ("reuse", "emit")


def adaln_chunks(linear: nn.Linear, c: torch.Tensor, chunks: tuple[int, ...], n: int) -> list[torch.Tensor]:
    """Chunks ``chunks`` (indices into ``n`` equal chunks, increasing) of ``linear(silu(c))``, each (B, D),
    computing only their rows of the weight: consecutive chunks share one matrix product."""
    size = linear.out_features // n
    h = F.silu(c)  # (B, D)
    out, start = [], 0
    while start < len(chunks):
        end = start
        while end + 1 < len(chunks) and chunks[end + 1] == chunks[end] + 1:
            end += 1
        lo, hi = chunks[start] * size, (chunks[end] + 1) * size
        bias = linear.bias[lo:hi] if linear.bias is not None else None
        out.extend(F.linear(h, linear.weight[lo:hi], bias).chunk(end - start + 1, dim=1))
        start = end + 1
    return out


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def gated_add(handle, x: torch.Tensor, gate: torch.Tensor, a: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``x + gate.unsqueeze(1) * a`` bit for bit (one ``addcmul`` under ``handle.lean == "fused"``): x (B, T, D),
    gate (B, D), a (B, T, D). ``in_place``: x may be overwritten (the caller proved nobody else holds it).
    Falls back to the plain expression where autograd records the graph or the shapes or dtypes differ."""
    g = gate.unsqueeze(1)  # (B, 1, D)
    if _needs_grad(x, gate, a) or a.shape != x.shape or not x.dtype == gate.dtype == a.dtype:
        return x + g * a
    if handle.lean == "fused":  # one pass, one rounding
        return x.addcmul_(g, a) if in_place else torch.addcmul(x, g, a)
    product = torch.mul(g, a, out=handle.scratch(a))  # (B, T, D), in a reused buffer
    return x.add_(product) if in_place else torch.add(x, product)


class Lane:
    """The residual stream between the blocks of one model call: remembers (weakly) the tensor the last
    block returned while nobody else can hold it, so that the next block may update it in place."""

    def __init__(self):
        self._ref = None

    def reset(self) -> None:
        self._ref = None

    def owns(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is the private output of the previous block of this call."""
        return self._ref is not None and self._ref() is x

    def hand_over(self, out: torch.Tensor, private: bool) -> None:
        self._ref = weakref.ref(out) if private and isinstance(out, torch.Tensor) else None


def hooked(*modules: nn.Module) -> bool:
    """Whether forward hooks (on these modules or global) could keep a block's inputs or outputs."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)
