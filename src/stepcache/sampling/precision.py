"""Where dtypes meet in a sampling loop: the model runs in its own dtype, the sampler in float32 or wider.

A model cast with ``model.to(torch.bfloat16)`` computes (and caches) in bf16, but the schedule tables
stay float64 numpy arrays looked up as float32, as the reference diffusion code does. The loop therefore
keeps its state ``x`` in ``float32`` (or the noise's dtype when wider), casts it to the model's dtype
on the way in and the model's output back on the way out. For a float32 model and float32 noise every
cast is a no-op, so float32 runs are unchanged bit for bit.

``synchronize`` is here too: timings of a sampling run on a GPU must wait for its queued kernels.
"""

from __future__ import annotations

from typing import Callable

import torch


def model_dtype(model) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 for a model without one)."""
    params = model.parameters() if hasattr(model, "parameters") else ()
    for p in params:
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def state_dtype(noise: torch.Tensor) -> torch.dtype:
    """The sampler's working dtype: float32, or the noise's dtype when it is wider (float64)."""
    return torch.promote_types(noise.dtype, torch.float32)


def at_boundary(fn: Callable, model_dtype_: torch.dtype, state: torch.dtype) -> Callable:
    """``fn(x, *rest)`` with ``x`` cast to the model's dtype and the output cast back to ``state``."""
    if model_dtype_ == state:
        return fn

    def call(x: torch.Tensor, *rest):
        return fn(x.to(model_dtype_), *rest).to(state)

    return call


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued CUDA work, so that a wall-clock reading covers the kernels (a no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
