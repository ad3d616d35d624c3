"""TaylorSeer: forecast cached features with a Taylor series (Liu, Zou et al., "From Reusing to
Forecasting: Accelerating Diffusion Models with TaylorSeers", arXiv 2503.06923, ICCV 2025).

A full step runs every block and refreshes, per site, the Taylor factors F0 (the value) and
F1..Fk (finite differences of the values at the last full steps). Between full steps the heavy
branch is not run: its output is the truncated series ``sum_k F_k x^k / k!`` with ``x`` the
number of sampler steps since the last full step. Gates, embeddings and the final layer run every
step (the runtime gates the forecast with the current step's gates).

Distances are counted in sampler steps (``s = ctx.progress``, 0 at the first step), never in
forward calls. Two rule sets, chosen by ``sites``:

``sites="branches"`` (the paper's code, quirks included): every block's attention and MLP outputs
are forecast; full iff ``s < W`` or ``s == W-1 + kN``; no forced last step. Differences begin at
step ``W-1`` (earlier full steps keep order 0), the order grows by one per full step, and every
order divides by the LATEST spacing only (not a true divided difference). The series is summed left
to right as ``(1/k!) * F_k * x**k``.

``sites="attention"`` (diffusers 0.42.1 ``TaylorSeerCacheConfig``): only attention modules are
forecast; full iff ``s < W`` or ``(s - W - 1) % N == 0`` (the first refresh after warm-up is at
``W+1``); differences at every full step after the first; each difference is taken in the feature
dtype and the factor stored in ``factors_dtype``; the sum is ``F_k.to(out) * (x**k / k!)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from stepcache.core.actions import COMPUTE, Emit
from stepcache.core.policy import Policy, PolicyConfig, register_policy
from stepcache.errors import ConfigError

SITES = ("branches", "attention")
FACTOR_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                 "float16": torch.float16, "model": None}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class TaylorSeer(PolicyConfig):
    """``TaylorSeer(interval=N, order=k, warmup=W, sites="branches")``.

    Args:
        interval: full steps are N apart after the warm-up; 1 computes every step (no cache).
        order: highest Taylor order k (0 = reuse the last value, as FORA does).
        warmup: the first W steps are full (the reference: 2 on DiT, 3 on FLUX, 1 on video models).
        sites: "branches" (attention and MLP of every block, the paper) or "attention" (only the
            attention modules, with diffusers' phase and warm-up rules, to equal its hook).
        factors_dtype: dtype of the stored factors ("float32", "float64", "bfloat16", "float16", or
            "model" for the feature dtype, as the reference keeps them); outputs are in the model dtype.

    Example: ``stepcache.apply(model, TaylorSeer(interval=4, order=2))``.
    """

    interval: int = 4
    order: int = 2
    warmup: int = 2
    sites: str = "branches"
    factors_dtype: str = "float32"
    method: ClassVar[str] = "taylorseer"

    def __post_init__(self) -> None:
        if not _is_int(self.interval) or self.interval < 1:
            raise ConfigError(f"TaylorSeer interval must be an integer >= 1, got {self.interval!r}.")
        if not _is_int(self.order) or self.order < 0:
            raise ConfigError(f"TaylorSeer order must be an integer >= 0, got {self.order!r}.")
        if not _is_int(self.warmup) or self.warmup < 1:
            raise ConfigError(f"TaylorSeer warmup must be an integer >= 1 (step 0 has nothing to forecast "
                              f"from), got {self.warmup!r}.")
        if self.sites not in SITES:
            raise ConfigError(f"TaylorSeer sites must be one of {', '.join(SITES)}, got {self.sites!r}.")
        if self.factors_dtype not in FACTOR_DTYPES:
            raise ConfigError(f"TaylorSeer factors_dtype must be one of {', '.join(FACTOR_DTYPES)}, "
                              f"got {self.factors_dtype!r}.")

    @property
    def rules(self) -> str:
        """Which implementation's schedule and arithmetic apply: "reference" or "diffusers"."""
        return "reference" if self.sites == "branches" else "diffusers"

    @classmethod
    def search_space(cls) -> dict:
        return {"interval": [2, 3, 4, 5, 6], "order": [1, 2, 3], "warmup": [1, 2, 3]}


# --- schedule -----------------------------------------------------------------------------------

def is_full_step(s: int, config: TaylorSeer) -> bool:
    """Whether step ``s`` (steps already taken) runs every block and refreshes the factors."""
    w, n = config.warmup, config.interval
    if s < w:
        return True
    if config.rules == "reference":
        return (s - (w - 1)) % n == 0  # the reference's counter: W-1+kN
    return (s - w - 1) % n == 0  # diffusers: first refresh at W+1


def full_steps(num_steps: int, config: TaylorSeer) -> list[int]:
    """Full steps of a run, as ``s`` (0 = first step)."""
    return [s for s in range(num_steps) if is_full_step(s, config)]


def takes_differences(s: int, config: TaylorSeer) -> bool:
    """Whether a full step at ``s`` may difference against the previous factors."""
    return s >= config.warmup - 1 if config.rules == "reference" else True


def reachable_order(num_steps: int, config: TaylorSeer) -> int:
    """The highest order the factors reach in a run of ``num_steps`` steps."""
    order, best, seen = 0, 0, False
    for s in full_steps(num_steps, config):
        order = min(order + 1, config.order) if seen and takes_differences(s, config) else 0
        seen, best = True, max(best, order)
    return best


def check_order(num_steps: int, config: TaylorSeer) -> None:
    """An order the history can never hold is a setting error, not a silent cap."""
    top = reachable_order(num_steps, config)
    if config.order > top:
        n_full = len(full_steps(num_steps, config))
        raise ConfigError(f"TaylorSeer order {config.order} needs more full steps than this run has ({n_full} in "
                          f"{num_steps} steps with interval {config.interval}, warmup {config.warmup}); "
                          f"use order <= {top} or a smaller interval.")


# --- the math: factor update and series evaluation ---------------------------------------------

def update_factors(old: Sequence[torch.Tensor], feature: torch.Tensor, distance: int, max_order: int, *,
                   difference: bool, dtype: torch.dtype | None, rules: str = "reference",
                   recycle: bool = False) -> list[torch.Tensor]:
    """New factors [F0, F1, ...] from a freshly computed ``feature`` and the previous factors ``old``.

    ``distance`` = steps since the previous full step (a Python int: the references divide by an int).
    Every order divides by this latest spacing only. ``dtype`` None keeps the feature dtype.
    ``recycle`` (reference rules): the differences are written into the buffers of the old factors they
    replace (F1 into the dropped top factor, F(k+1) into the old Fk, k >= 1: each is read just before it
    is overwritten), so a refresh allocates nothing; the old factors are consumed. Same bits.
    """
    store = dtype or feature.dtype
    if rules == "reference":  # difference in the factor dtype
        new = [feature.to(store)]
        for k in range(max_order):
            if not difference or k >= len(old) or old[k].shape != new[k].shape:
                break
            buf = _spare(old, k, max_order, new[k]) if recycle else None
            if buf is None:
                new.append((new[k] - old[k]) / distance)
            else:  # (new_k - old_k) / distance, in place in a buffer nobody else holds
                new.append(torch.sub(new[k], old[k], out=buf).div_(distance))
        return new
    new = [feature]  # diffusers: difference in the feature dtype, then store
    for k in range(max_order):
        if not difference or k >= len(old) or old[k].shape != new[k].shape:
            break
        new.append((new[k] - old[k].to(feature.dtype)) / distance)
    return [f.to(store) for f in new]


def _spare(old: Sequence[torch.Tensor], k: int, max_order: int, like: torch.Tensor) -> torch.Tensor | None:
    """The old factor whose buffer may take the new F(k+1): F(k) itself for k >= 1 (read by the same
    subtraction, needed by nothing after it), the dropped top factor for k = 0 (never the old F0: that
    is a computed output, which the runtime holds)."""
    if k >= 1:
        buf = old[k]
    elif len(old) > max_order >= 1:
        buf = old[max_order]
    else:
        return None
    return buf if buf.shape == like.shape and buf.dtype == like.dtype else None


def forecast(factors: Sequence[torch.Tensor], offset: int, dtype: torch.dtype, *,
             rules: str = "reference", scratch=None) -> torch.Tensor:
    """The truncated Taylor series at ``offset`` steps after the last full step, in ``dtype``.

    The terms are formed and summed in place, in the references' order and roundings (addition
    commutes exactly): one new tensor (the output), and for orders >= 2 one temporary, taken from
    ``scratch(like)`` when given (a reused buffer, e.g. ``view.scratch``).
    """
    if not factors:
        raise ConfigError("TaylorSeer has no factors to forecast from; the first step must be a full step.")
    temp = scratch or torch.empty_like
    if rules == "reference":  # (1/k!) * F_k * x**k, summed left to right in the factor dtype
        if len(factors) == 1:
            return factors[0].clone().to(dtype)  # 1.0 * F0 * 1 is F0 itself
        # k = 1: (1.0 * F1) * x is F1 * x bit for bit; F0 + F1 x as F1 x + F0
        out = torch.mul(factors[1], offset).add_(factors[0])
        for k in range(2, len(factors)):  # ((1/k!) * F_k) * x**k, then added
            term = torch.mul(factors[k], 1 / math.factorial(k), out=temp(factors[k])).mul_(offset ** k)
            out.add_(term)
        return out.to(dtype)
    if len(factors) == 1:  # diffusers: 0 + F0 * 1.0 is F0 (up to the sign of a zero)
        out = factors[0].to(dtype)
        return out.clone() if out is factors[0] else out
    # each factor cast to the output dtype, x^k/k! multiplied after it; F0 + t1 as t1 + F0
    out = torch.mul(factors[1].to(dtype), offset / 1).add_(factors[0].to(dtype))
    for k in range(2, len(factors)):
        term = factors[k].to(dtype)
        out.add_(torch.mul(term, offset ** k / math.factorial(k), out=temp(term)))
    return out


def forecast_macs(factors: Sequence[torch.Tensor]) -> int:
    """Elementwise work of one forecast: about one multiply-add per element and order, plus the copy."""
    return factors[0].numel() * len(factors) if factors else 0


class TaylorSeries:
    """The factors of one feature with the step of their last refresh (the state object, model-free).

    ``update(feature, s)`` at a full step, ``predict(s)`` at a forecast step. Used directly by tests
    and by composed policies (e.g. DBCache forecasting a span residual).
    """

    def __init__(self, max_order: int, dtype: torch.dtype | None = torch.float32, rules: str = "reference",
                 differences_from: int = 0):
        self.max_order, self.dtype, self.rules = max_order, dtype, rules
        self.differences_from = differences_from  # first step allowed to take differences
        self.factors: list[torch.Tensor] = []
        self.last_step: int | None = None

    @property
    def order(self) -> int:
        return len(self.factors) - 1

    def reset(self) -> None:
        self.factors, self.last_step = [], None

    def update(self, feature: torch.Tensor, s: int) -> None:
        if s == self.last_step:  # a second solver stage of the same step: the step's first value stands
            return
        distance = 0 if self.last_step is None else s - self.last_step
        difference = self.last_step is not None and s >= self.differences_from
        self.factors = update_factors(self.factors, feature, distance, self.max_order, difference=difference,
                                      dtype=self.dtype, rules=self.rules)
        self.last_step = s

    def predict(self, s: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.last_step is None:
            raise ConfigError("TaylorSeer cannot forecast before its first full step.")
        dtype = dtype or self.factors[0].dtype
        return forecast(self.factors, s - self.last_step, dtype, rules=self.rules)

    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.factors)


# Branch sites forecast under sites="attention": the modules diffusers' default patterns hook (names
# ending in "attn"). The adapters name that branch "attn"; diffusers' DiT and PixArt call the module
# "attn1", which its patterns miss (its hook then forecasts nothing): we forecast it, and say so.
ATTENTION_BRANCHES = ("attn",)


@register_policy(TaylorSeer)
class TaylorSeerPolicy(Policy):
    """Routes the factor table of every forecast site through the runtime's slots (counted memory):
    ``slots["F"]`` = [F0, F1, ...], ``slots["s"]`` = step of the last refresh, ``slots["dtype"]``."""

    def __init__(self, config: TaylorSeer, info):
        super().__init__(config, info)
        wanted = info.branches if config.sites == "branches" else ATTENTION_BRANCHES
        self.targets = frozenset(b for b in info.branches if b in wanted)
        if not self.targets:
            raise ConfigError(f"TaylorSeer(sites={config.sites!r}) finds no branch to forecast on {info.family} "
                              f"(branches: {', '.join(info.branches)}); use sites='branches'.")
        self.dtype = FACTOR_DTYPES[config.factors_dtype]

    def reset(self, run) -> None:
        super().reset(run)
        check_order(run.num_steps, self.config)

    def decide(self, ctx, site, view):
        s = ctx.progress
        if site.is_span or site.name not in self.targets or is_full_step(s, self.config):
            return COMPUTE
        slots = view.memory
        factors = slots.get("F")
        if not factors:
            raise ConfigError(f"TaylorSeer has nothing to forecast {site} from at step {ctx.i}: the run must start "
                              "with a full step.")
        out = forecast(factors, s - slots["s"], slots["dtype"], rules=self.config.rules, scratch=view.scratch)
        return Emit(out, macs=forecast_macs(factors))

    def observe(self, ctx, site, result) -> None:
        s = ctx.progress
        if site.is_span or site.name not in self.targets or not is_full_step(s, self.config):
            return
        slots = result.memory
        old, prev = slots.get("F", []), slots.get("s")
        if prev == s:  # a second solver stage of the same step: the step's first value stands
            return
        slots["F"] = update_factors(old, result.output, 0 if prev is None else s - prev, self.config.order,
                                    difference=prev is not None and takes_differences(s, self.config),
                                    dtype=self.dtype, rules=self.config.rules, recycle=True)
        slots["s"], slots["dtype"] = s, result.output.dtype
