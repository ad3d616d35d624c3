"""Record what MagCache and TeaCache need from uncached runs of any supported model.

A :class:`Recorder` is installed like a policy (it computes everything): per model call of a step
(cond / uncond kept apart) it records the magnitude ratio of the whole-stack residual
``mean ||R_s|| / ||R_{s-1}||`` (MagCache) and, where the adapter provides the first block's
modulated input, its rel-L1 change ``x_s`` together with the rel-L1 change ``y_s`` of the model
output (TeaCache's calibration pairs). :func:`calibrate` runs a sampling function under it several
times and reduces the records: ratios averaged per step, ``np.polyfit(x, y, 4)`` over every pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from stepcache.core.actions import COMPUTE
from stepcache.core.policy import Policy, PolicyConfig, register_policy
from stepcache.errors import ConfigError
from stepcache.policies.calibrate_math import fit_teacache, magnitude_ratio, mean_ratios
from stepcache.policies.fbcache import hidden_part
from stepcache.policies.indicators import rel_l1


@dataclass(frozen=True)
class Recorder(PolicyConfig):
    """Computes every site and records calibration signals (``stepcache calibrate``; not a cache)."""

    method: ClassVar[str] = "calibration-recorder"


class CallRecord:
    """The signals of one model call index over one run."""

    def __init__(self) -> None:
        self.residual: torch.Tensor | None = None
        self.modulated: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.ratios: list[float] = []
        self.x: list[float] = []
        self.y: list[float] = []


@register_policy(Recorder)
class RecorderPolicy(Policy):
    caches = False

    def __init__(self, config, info):
        super().__init__(config, info)
        self.teacache = "modulated_input" in info.capabilities
        self.finished: list[CallRecord] = []  # records of finished runs (all call indices)

    def new_call_state(self):
        record = CallRecord()
        self.finished.append(record)
        return record

    def spans(self):
        return ((0, self.info.depth),)

    def decide(self, ctx, site, view):
        if site.is_span and self.teacache:
            m = view.probe("modulated_input")  # (B, T, D)
            rec = self.state
            if rec.modulated is not None:
                rec.x.append(rel_l1(rec.modulated, m))
            rec.modulated = m
        return COMPUTE

    def observe(self, ctx, site, result) -> None:
        if not site.is_span:
            return
        rec = self.state
        R = hidden_part(result.output, self.info)  # (B, T, D): the image stream, as MagCache measures it
        rec.ratios.append(1.0 if rec.residual is None else magnitude_ratio(rec.residual, R))
        rec.residual = R

    def note_output(self, out: torch.Tensor) -> None:
        """The model's output of the current call (set by :func:`calibrate`'s forward hook)."""
        rec = self.state
        if rec.output is not None:
            rec.y.append(rel_l1(rec.output, out))
        rec.output = out.detach()


def calibrate(model, run: Callable[[], Any], *, repeats: int = 1) -> dict:
    """Run ``run()`` (one sampling run of ``model``, a model or pipeline) ``repeats`` times under a
    :class:`Recorder`; returns ``{"family", "num_steps", "mag_ratios", "teacache_coefficients", "teacache_r2",
    "pairs"}`` (TeaCache entries None when the adapter has no modulated-input probe)."""
    from stepcache.api import apply

    handle = apply(model, Recorder())
    recorder: RecorderPolicy = handle.handler

    def hook(module, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        recorder.note_output(out)

    hook_handle = handle.model.register_forward_hook(hook)
    try:
        for _ in range(repeats):
            run()
    finally:
        hook_handle.remove()
        handle.remove()
    records = [r for r in recorder.finished if r.ratios]
    if not records:
        raise ConfigError("The calibration run never called the model under a sampling clock.")
    num_steps = len(records[0].ratios)
    ratios = mean_ratios([r.ratios for r in records])
    result = {"family": handle.info.family, "num_steps": num_steps, "mag_ratios": ratios,
              "teacache_coefficients": None, "teacache_r2": None, "pairs": 0}
    if recorder.teacache:
        x = [v for r in records for v in r.x]
        y = [v for r in records for v in r.y]
        n = min(len(x), len(y))
        coefficients, r2 = fit_teacache(x[:n], y[:n])
        result.update(teacache_coefficients=coefficients, teacache_r2=r2, pairs=n)
    return result
