"""ToCa: token-wise feature caching (Zou et al., "Accelerating Diffusion Transformers with Token-wise
Feature Caching", arXiv 2410.05317, ICLR 2025), for DiT.

Full steps compute every block on every token and cache its un-gated attention and MLP outputs;
partial steps reuse the attention output (DiT: attention is never recomputed partially) and
recompute the MLP on the k top-scored tokens of each batch row (cond and uncond rows choose their
own), scattering them into the MLP cache. By default the reference implementation is reproduced
exactly, quirks included:

- The refresh interval is recomputed at layer 0's full computation
  (``round_half_even(N / float32(1 + w - 2 w i / S))`` with w = 0.4, or w = 0 for
  ``fresh_ratio = 0``, and 2 inside ``int(0.2 S) <= i < int(0.4 S)``), and the new value already
  applies to layers 1.. of the same step: some steps are "mixed" (layer 0 full, the rest partial).
  ``decision="per-step"`` decides once per step instead (the new interval applies from the next step).
- k = ``int(float32(clamp(float32(ratio), 0, 1)) * T)``, ratio a Python float from the schedule.
- The schedules' layer normaliser 27 (hard-coded for 28-layer DiT-XL) is generalised as
  ``depth - 1`` (exactly 27 for depth 28; 1 for a one-layer model).
- Scores: see :mod:`stepcache.policies.toca_scores`; then staleness (weight / N) and the 2x2 bonus.

PixArt variant (``variant="pixart"``, chosen automatically on diffusers' PixArt transformer; the
reference's PixArt-alpha code): the block is gated self-attention -> un-gated cross-attention ->
gated MLP; partial steps reuse the self-attention and recompute the cross-attention and the MLP on
their own top-k tokens. Steps count UP (``p = S - 1 - i``): a block is full iff ``p == 0`` or
``p % interval == 0``, the interval re-set at layer 0's full computation to
``round(float32(N) / float32(0.8 + 0.4 p / S))`` (no sensitive band). The ``ToCa-pixart`` ratio is
``fresh_ratio * (1.6 - 1.2 l / (depth-1)) * (1.9 - 1.8 p / S) * m``, m = 0.6 (cross) or 1.6 (MLP).
The ``attention`` score is s2: the cross-attention maps of the two CFG halves are averaged (the
reference packs the batch's captions into one sequence, so the halves' maps sit side by side, each
weighted 0.5: ``H = H(p_uncond / 2) + H(p_cond / 2)``), the entropy over the text tokens
``-sum p log(p + 1e-7)`` is L2-normalised as ``1 + H``, and the SAME
tokens are chosen for both halves; then staleness (a counter per module) and a 4x4-cell bonus of
0.4. The entropy is taken at full steps and refreshed, token by token, for the tokens a partial
cross-attention recomputes (so the MLP right after scores with the updated rows; per-token entropy
of the averaged map equals what averaging the scattered maps would give, and no map is kept). Defaults under
this variant: fresh_ratio 0.30, schedule ``ToCa-pixart``, bonus 0.4 on 4x4 cells.

Other diffusers models (docs/diffusers.md): branches other than attn/mlp/cross are Compute/Reuse by
layer; SD3/FLUX (no attention map) refuse map scores; state is kept per ``StepContext.call``
(FLUX true CFG). ``variant="dit"`` on PixArt keeps DiT's rules (tokens chosen at "cross" are reused
by "mlp").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from stepcache.errors import ConfigError
from stepcache.policies import toca_scores as S
from stepcache.core.context import ModelInfo
from stepcache.core.policy import Policy, PolicyConfig, register_policy
from stepcache.core.actions import COMPUTE, COMPUTE_WITH_MAP, COMPUTE_WITH_VALUES, REUSE, Emit, Partial

SCHEDULES = ("ToCa-ddpm250", "ToCa-ddim50", "constant", "linear", "exp", "layerwise", "linear-layerwise",
             "linear-mode", "ToCa-pixart")
# (step weight, layer weight) of the schedules of the form ratio * layer_f * step_f * module_f.
_PRODUCT_WEIGHTS = {"ToCa-ddpm250": (0.4, 0.8), "ToCa-ddim50": (2.0, -0.2), "linear-layerwise": (0.4, 0.8)}
DECISIONS = ("reference", "per-step")
VARIANTS = ("auto", "dit", "pixart", "opensora")  # opensora: policies/toca_opensora.py
# Settings a ToCa() leaves unset (None) take the reference's values of the variant in use.
VARIANT_DEFAULTS = {
    "dit": {"fresh_ratio": 0.07, "schedule": "ToCa-ddim50", "bonus": 0.6, "bonus_grid": 2},
    "pixart": {"fresh_ratio": 0.30, "schedule": "ToCa-pixart", "bonus": 0.4, "bonus_grid": 4},
}
DIT_ONLY_SCHEDULES = ("ToCa-ddpm250", "ToCa-ddim50")
PIXART_SCORES = ("attention", "random", "similarity", "norm", "kv-norm", "straight")
PARTIAL_BRANCHES = ("attn", "mlp", "cross")  # any other branch: Compute on full layers, else Reuse


@dataclass(frozen=True)
class ToCa(PolicyConfig):
    """``ToCa(interval=N, fresh_ratio=R, schedule=..., score=...)``.

    interval: forced full-refresh interval N (reference ``fresh_threshold``).
    fresh_ratio: base share of tokens recomputed on partial steps, before the schedule's factors
        (reference ``fresh_ratio``; unset: 0.07 for DiT, i.e. 93 % cached, 0.30 for PixArt).
    schedule: one of :data:`SCHEDULES` (unset: ``ToCa-ddim50``, the DiT DDIM-50 one; ``ToCa-ddpm250``
        for DDPM-250; ``ToCa-pixart`` under the PixArt variant).
    score: one of :data:`stepcache.policies.toca_scores.SCORES`; ``kv-norm``, ``norm``,
        ``similarity``, ``random`` and ``straight`` need no attention map (full steps keep SDPA).
        Under the PixArt variant ``attention`` is the cross-attention entropy s2.
    staleness_weight: weight of the cache-staleness score s3 (reference ``soft_fresh_weight``).
    bonus / bonus_grid: s4, ``+ max * bonus`` to the arg-max token of each grid x grid cell (0: off;
        unset: 0.6 on 2x2 cells for DiT, 0.4 on 4x4 cells for PixArt).
    decision: ``"reference"`` (interval re-decided at layer 0, mixed steps) or ``"per-step"``.
    variant: ``"auto"`` (PixArt rules on diffusers' PixArt transformer, DiT rules elsewhere),
        ``"dit"`` or ``"pixart"``.
    forecast: DiT rules only (stepcache's composition, not in the reference): on partial steps the
        attention output and the MLP tokens that are not recomputed come from a linear extrapolation of
        the last two full steps' outputs instead of the cache; the recomputed tokens are written into it.
    """

    interval: int = 3
    fresh_ratio: float | None = None
    schedule: str | None = None
    score: str = "attention"
    staleness_weight: float = 0.25
    bonus: float | None = None
    bonus_grid: int | None = None
    decision: str = "reference"
    variant: str = "auto"
    forecast: bool = False
    method: ClassVar[str] = "toca"

    @classmethod
    def search_space(cls) -> dict[str, list]:
        return {"interval": [2, 3, 4, 5, 6], "fresh_ratio": [0.05, 0.1, 0.2, 0.3]}

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ConfigError(f"ToCa interval must be an integer >= 1, got {self.interval!r}.")
        if self.fresh_ratio is not None and (not _is_real(self.fresh_ratio) or not 0.0 <= self.fresh_ratio <= 1.0):
            raise ConfigError(f"ToCa fresh_ratio must lie in [0, 1], got {self.fresh_ratio!r}.")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ConfigError(f"Unknown ToCa schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}.")
        if self.score not in S.SCORES:
            raise ConfigError(f"Unknown ToCa score {self.score!r}; choose one of {', '.join(S.SCORES)}.")
        if self.decision not in DECISIONS:
            raise ConfigError(f"ToCa decision must be one of {', '.join(DECISIONS)}, got {self.decision!r}.")
        if self.variant not in VARIANTS:
            raise ConfigError(f"ToCa variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}.")
        for name in ("staleness_weight", "bonus"):
            value = getattr(self, name)
            if value is not None and (not _is_real(value) or value < 0):
                raise ConfigError(f"ToCa {name} must be a finite number >= 0, got {value!r}.")
        g = self.bonus_grid
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ConfigError(f"ToCa bonus_grid must be an integer >= 1, got {g!r}.")

    def resolved(self, variant: str) -> "ToCa":
        """This config with ``variant`` ("dit" or "pixart") and its defaults for the unset settings."""
        unset = {k: v for k, v in VARIANT_DEFAULTS[variant].items() if getattr(self, k) is None}
        cfg = replace(self, variant=variant, **unset)
        if variant != "dit" and cfg.forecast:
            raise ConfigError("ToCa forecast=True is a composition of the DiT rules; use variant='dit' or "
                              "forecast=False.")
        if variant == "pixart":
            if cfg.schedule in DIT_ONLY_SCHEDULES:
                raise ConfigError(f"ToCa schedule {cfg.schedule!r} is DiT's; the PixArt variant takes one of "
                                  f"{', '.join(x for x in SCHEDULES if x not in DIT_ONLY_SCHEDULES)}.")
            if cfg.score not in PIXART_SCORES:
                raise ConfigError(f"ToCa score {cfg.score!r} is not available under the PixArt variant; choose one "
                                  f"of {', '.join(PIXART_SCORES)}.")
        elif cfg.schedule == "ToCa-pixart":
            raise ConfigError("ToCa schedule 'ToCa-pixart' belongs to the PixArt variant (variant='pixart').")
        return cfg

    @property
    def needs_attention_map(self) -> bool:
        """True when full steps must run explicit-softmax attention (no fused SDPA)."""
        return self.score in S.MAP_SCORES


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------- schedules
def next_interval(interval: int, fresh_ratio: float, i: int, num_steps: int) -> int:
    """The refresh interval set at a full step i (reference op order: float32, reciprocal-multiply,
    torch.round half-even), and 2 inside the sensitive band int(0.2 S) <= i < int(0.4 S)."""
    w = 0.4 if fresh_ratio != 0 else 0.0
    value = _rounded_interval(interval, 1 + w - 2 * w * i / num_steps)
    if fresh_ratio != 0 and int(0.2 * num_steps) <= i < int(0.4 * num_steps):
        value = 2
    return value


def next_interval_pixart(interval: int, fresh_ratio: float, p: int, num_steps: int) -> int:
    """PixArt variant: the interval set at a full step p (counting up), reference op order:
    ``round_half_even(N / float32(1 - w + 2 w p / S))``, w = 0.2 (0 for fresh_ratio 0); no band."""
    w = 0.2 if fresh_ratio != 0 else 0.0
    return _rounded_interval(interval, 1 - w + 2 * w * p / num_steps)


def _rounded_interval(interval: int, step_factor: float) -> int:
    """``round_half_even(N / float32(step_factor))`` in torch's float32 arithmetic (N / t is
    ``t.reciprocal() * N``), as both reference implementations compute it."""
    return int(torch.round(interval / torch.tensor(step_factor)))


def pixart_ratio(cfg: ToCa, p: int, num_steps: int, layer: int, depth: int, branch: str) -> float:
    """PixArt variant: recomputed share of ``branch`` ("cross" or "mlp") at step p (counting up)."""
    if cfg.schedule in ("ToCa-pixart", "linear-layerwise"):  # the reference's PixArt "ToCa" schedule
        step_weight, layer_weight, module_weight, module_time_weight = -0.9, 0.6, 1.0, 0.6
        step_factor = 1 - step_weight + 2 * step_weight * p / num_steps
        layer_factor = 1 + layer_weight - 2 * layer_weight * layer / max(depth - 1, 1)
        module_factor = ((1 - (1 - module_time_weight) * module_weight) if branch == "cross"
                         else (1 + module_time_weight * module_weight))  # 0.6 cross, 1.6 MLP
        return cfg.fresh_ratio * layer_factor * step_factor * module_factor
    return mlp_ratio(cfg, p, num_steps, layer, depth)  # the other schedules: same formulas, step p


def mlp_ratio(cfg: ToCa, i: int, num_steps: int, layer: int, depth: int) -> float:
    """Recomputed share of the MLP tokens at step i, layer l (Python float, reference op order)."""
    r, norm = cfg.fresh_ratio, max(depth - 1, 1)  # norm: 27 for the 28-layer DiT-XL
    if cfg.schedule in _PRODUCT_WEIGHTS:
        sw, lw = _PRODUCT_WEIGHTS[cfg.schedule]
        step_factor = 1 + sw - 2 * sw * i / num_steps
        layer_factor = 1 + lw - 2 * lw * layer / norm
        module_factor = 1 + 0.6 * 2.5  # MLP: 1 + module_time_weight * module_weight
        return r * layer_factor * step_factor * module_factor
    w = 0.9
    if cfg.schedule == "constant":
        return r
    if cfg.schedule == "linear":
        return r * (1 + w - 2 * w * i / num_steps)
    if cfg.schedule == "exp":
        return r * (w ** (i / num_steps))
    if cfg.schedule == "layerwise":
        return r * (1 + w - 2 * w * layer / norm)
    mode = (i % cfg.interval) / cfg.interval - 0.5  # linear-mode
    return r * (1 + w - 2 * w * i / num_steps + 0.1 * mode)


def tokens_to_compute(ratio: float, num_tokens: int) -> int:
    """k = int(float32(clamp(float32(ratio), 0, 1)) * T), the product rounded in float32."""
    share = np.clip(np.float32(ratio), np.float32(0.0), np.float32(1.0))
    return int(share * np.float32(num_tokens))


def full_steps(cfg: ToCa, num_steps: int, depth: int = 28) -> tuple[list[int], list[int]]:
    """(steps where every layer refreshes, mixed steps where only some do), both as the descending
    index i (the PixArt variant's step p is ``num_steps - 1 - i``)."""
    pixart = cfg.variant == "pixart"
    g = cfg.resolved("pixart" if pixart else "dit").bonus_grid
    info = ModelInfo(depth=depth, num_tokens=g * g, grid=(g, g), branches=("attn", "cross", "mlp") if pixart
                     else ("attn", "mlp"), variant="pixart" if pixart else None,
                     capabilities=frozenset({"attention_map", "value_norms"}))
    handler = ToCaPolicy(cfg, info)
    handler.reset(None)
    handler.state = handler.new_call_state()
    full, mixed = [], []
    for i in range(num_steps - 1, -1, -1):
        flags = [handler.block_full(i, num_steps, layer) for layer in range(depth)]
        (full if all(flags) else mixed if any(flags) else []).append(i)
    return full, mixed


# ---------------------------------------------------------------------------------- handler
class ToCaState:
    """What ToCa keeps per model call of a step (cond / uncond calls never mix)."""

    def __init__(self, interval: int, depth: int):
        self.interval = interval
        self.block_flags = [False] * depth  # full or partial, per layer, this step
        self.step_seen = None  # per-step decision: the step already decided, and its flag
        self.step_flag = False
        self.counters: dict = {}  # (rows, T) int32 staleness per layer (or (layer, module)); None: all zero
        self.saved: dict[int, torch.Tensor] = {}  # (rows, T) score part from the last full step
        self.x = self.cached = None  # the input (B, T, D) and cache of the branch being decided
        self.cross_index: dict[int, torch.Tensor] = {}  # variant dit on PixArt: tokens of "cross" reused by "mlp"
        self.entropy: dict[int, torch.Tensor] = {}  # variant pixart: cross-attention entropy (rows or CFG pairs, T)


@register_policy(ToCa)
class ToCaPolicy(Policy):
    """Per-run state: refresh interval, per-layer staleness counters (rows, T) int32, and the
    score inputs of the last full step (attention received or value norms, (rows, T))."""

    def __new__(cls, config: ToCa, info: ModelInfo):
        """STDiT3 (or variant="opensora") gets the OpenSora variant's handler (policies/toca_opensora.py)."""
        from stepcache.policies import toca_opensora as opensora

        if config.variant == "opensora" or (config.variant == "auto" and info.variant == "opensora"):
            return opensora.OpenSoraToCaPolicy(config, info)
        return super().__new__(cls)

    needs_input: ClassVar[tuple] = ("mlp", "cross")  # scored from the branch input; others may be decided ahead

    def __init__(self, config: ToCa, info: ModelInfo):
        variant = config.variant
        if variant == "auto":
            variant = "pixart" if info.variant == "pixart" else "dit"
        if variant == "pixart" and "cross" not in info.branches:
            raise ConfigError(f"ToCa's PixArt variant needs a cross-attention branch, which {info.family} has not.")
        config = config.resolved(variant)
        super().__init__(config, info)
        self.pixart = variant == "pixart"
        self._check_grid()
        if config.needs_attention_map and "attention_map" not in info.capabilities:
            usable = ", ".join(x for x in S.SCORES if x not in S.MAP_SCORES)
            raise ConfigError(f"ToCa score {config.score!r} needs an attention map, which {info.family} cannot "
                              f"give (joint attention); choose one of {usable}.")
        self.reset(None)

    def _check_grid(self) -> None:
        h, w = self.info.grid
        g = self.config.bonus_grid
        if self.config.bonus > 0 and (h % g or w % g):
            raise ConfigError(f"ToCa's spatial bonus needs a token grid divisible by bonus_grid={g}, got {h}x{w}; "
                              "set bonus=0 or another bonus_grid.")

    def reset(self, run) -> None:
        """A new run. diffusers models publish their token grid at call time (the resolution of the call), so
        the bonus cells are checked again here, before the run's first step."""
        super().reset(run)
        self._check_grid()

    def new_call_state(self) -> "ToCaState":
        return ToCaState(self.config.interval, self.info.depth)

    # ------------------------------------------------------------------ step type
    def block_full(self, i: int, num_steps: int, layer: int) -> bool:
        """Whether block ``layer`` computes fully at step i; updates the interval like the reference."""
        cfg, first = self.config, i == num_steps - 1
        pos = num_steps - 1 - i if self.pixart else i  # the step the modulo counts: PixArt counts up
        rule = next_interval_pixart if self.pixart else next_interval
        if cfg.decision == "per-step":
            if self.state.step_seen != i:
                self.state.step_seen, self.state.step_flag = i, first or pos % self.state.interval == 0
                if self.state.step_flag:
                    self.state.interval = rule(cfg.interval, cfg.fresh_ratio, pos, num_steps)
            return self.state.step_flag
        interval = cfg.interval if first else self.state.interval
        full = first or pos % interval == 0
        if full and layer == 0:  # the new interval already applies to layers 1.. of this step
            self.state.interval = rule(cfg.interval, cfg.fresh_ratio, pos, num_steps)
        return full

    # ------------------------------------------------------------------ runtime API
    def decide(self, ctx, site, view):
        layer, branch = site.layer, site.name
        if branch in self.needs_input:
            self.state.x, self.state.cached = view.input, view.cached  # (B, T, D) each
        if self.pixart:
            return self._decide_pixart(ctx, layer, branch)
        if branch not in PARTIAL_BRANCHES:  # e.g. SD3/FLUX "context_mlp", SD3.5 "attn2"
            return COMPUTE if self.state.block_flags[layer] else REUSE
        if branch == "cross":  # PixArt: choose the tokens here; "mlp" reuses the same index
            if self.state.block_flags[layer]:
                return COMPUTE
            self.state.cross_index[layer] = self.select(ctx, layer)
            return Partial(self.state.cross_index[layer])
        if branch == "attn":
            full = self.block_full(ctx.i, ctx.num_steps, layer)
            self.state.block_flags[layer] = full
            if not full:
                return self._extrapolated(ctx, view) if self.config.forecast else REUSE
            score = self.config.score if self.config.fresh_ratio > 0 else None  # R = 0: exactly FORA
            return COMPUTE_WITH_MAP if score in S.MAP_SCORES else COMPUTE_WITH_VALUES if score == "kv-norm" \
                else COMPUTE
        full = self.state.block_flags[layer]
        if full:
            self.state.counters[layer] = None
            return COMPUTE
        index = self.state.cross_index.pop(layer, None)
        index = self.select(ctx, layer, branch) if index is None else index
        if self.config.forecast:
            base = self._extrapolated(ctx, view)
            if base.kind == "emit":
                return Partial(index, base=base.tensor, macs=base.macs)
        return Partial(index)

    def _extrapolated(self, ctx, view):
        """``forecast=True``: the site's output at this step extrapolated linearly from its last two full
        steps (Emit), or Reuse while only one is known."""
        slots = view.memory
        if "prev" not in slots:
            return REUSE
        (s0, f0), (s1, f1) = slots["prev"], slots["last"]
        w = (ctx.progress - s1) / (s1 - s0)
        out = f1 * (1 + w)
        out.add_(f0, alpha=-w)
        return Emit(out, macs=2 * f1.numel())

    def _remember(self, ctx, site, result) -> None:
        """Keep the last two full-step outputs of a site (``forecast=True``)."""
        slots = result.memory
        if result.index is not None or slots.get("last", (None,))[0] == ctx.progress:
            return
        if "last" in slots:
            slots["prev"] = slots["last"]
        slots["last"] = (ctx.progress, result.output.clone())

    def _decide_pixart(self, ctx, layer: int, branch: str):
        """PixArt variant: "attn" decides the block; "cross" and "mlp" each pick their own top-k tokens."""
        active = self.config.fresh_ratio > 0  # R = 0: exactly FORA, no scores needed
        if branch == "attn":
            full = self.block_full(ctx.i, ctx.num_steps, layer)
            self.state.block_flags[layer] = full
            if not full:
                return REUSE
            return COMPUTE_WITH_VALUES if active and self.config.score == "kv-norm" else COMPUTE
        if branch not in ("cross", "mlp"):
            return COMPUTE if self.state.block_flags[layer] else REUSE
        cross_map = branch == "cross" and active and self.config.score == "attention"
        if self.state.block_flags[layer]:
            self.state.counters[(layer, branch)] = None
            return COMPUTE_WITH_MAP if cross_map else COMPUTE
        return Partial(self.select(ctx, layer, branch), need_map=cross_map)

    def observe(self, ctx, site, result) -> None:
        layer, branch = site.layer, site.name
        attn_map, values, index = result.attn_map, result.values, result.index
        if self.config.forecast and branch in ("attn", "mlp"):
            self._remember(ctx, site, result)
        if self.pixart and branch == "cross" and attn_map is not None:
            shared = self._shared_rows(attn_map.shape[0])
            fresh = S.cross_entropy(attn_map, shared, own_text=True)  # (rows or pairs, T or k)
            if index is None:  # a full step: the whole map (B, T, L)
                self.state.entropy[layer] = fresh
            else:  # the rows of the recomputed queries (the same tokens in both CFG halves)
                index = index[: fresh.shape[0]]
                self.state.entropy[layer].scatter_(1, index, fresh.to(self.state.entropy[layer].dtype))
            return
        if branch != "attn":
            return
        if attn_map is not None:  # (B, T, T); keep only what the score needs, (B, T)
            fn = S.attention_over_max if self.config.score == "compress" else S.attention_received
            self.state.saved[layer] = fn(attn_map)
        elif values is not None:  # (B, H, T)
            self.state.saved[layer] = S.value_norm_score(values)

    # ------------------------------------------------------------------ token selection
    def select(self, ctx, layer: int, branch: str = "mlp") -> torch.Tensor:
        """Top-k token indices (rows, k) of ``layer`` at a partial step; updates the staleness counter
        (one per layer; under the PixArt variant one per layer and module)."""
        x = self.state.x  # (B, T, D)
        rows, T = x.shape[0], x.shape[1]
        if self.pixart:
            key, p = (layer, branch), ctx.num_steps - 1 - ctx.i
            k = tokens_to_compute(pixart_ratio(self.config, p, ctx.num_steps, layer, self.info.depth, branch), T)
        else:
            key = layer
            k = tokens_to_compute(mlp_ratio(self.config, ctx.i, ctx.num_steps, layer, self.info.depth), T)
        counter = self.state.counters.get(key)
        if counter is None:
            counter = torch.zeros(rows, T, dtype=torch.int32, device=x.device)
            self.state.counters[key] = counter
        index = torch.empty(rows, 0, dtype=torch.long, device=x.device)
        if k or (self.config.score in S.RANDOM_SCORES and self.config.fresh_ratio > 0):  # RNG drawn as reference
            score = self.score(layer, counter, x)
            if self.pixart and self._shared_rows(rows):  # identical halves: the same tokens for both
                half = score[: rows // 2].argsort(dim=-1, descending=True)[:, :k]
                index = torch.cat([half, half], dim=0)
            else:
                index = score.argsort(dim=-1, descending=True)[:, :k]  # per row: cond and uncond apart
        counter += 1
        counter.scatter_(1, index, 0)
        return index

    def score(self, layer: int, counter: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Score (rows, T): base score + staleness s3 + spatial bonus s4."""
        cfg = self.config
        s = self.base_score(layer, x)
        s = S.with_staleness(s, counter, cfg.staleness_weight, cfg.interval)
        if cfg.bonus > 0:
            s = S.spatial_bonus(s, self.info.grid, cfg.bonus, cfg.bonus_grid)
        return s

    def _shared_rows(self, rows: int) -> bool:
        """PixArt variant: the score is the same for both CFG halves (s2 averages them; random draws once)."""
        return bool(self.run is not None and self.run.cfg and rows % 2 == 0
                    and self.config.score in ("attention", "random"))

    def base_score(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        name, rows, T = self.config.score, x.shape[0], x.shape[1]
        cfg_rows = bool(self.run is not None and self.run.cfg)
        if self.pixart and name == "attention":
            return S.entropy_score(self.state.entropy[layer], self._shared_rows(rows))
        if name in ("attention", "kv-norm"):
            return self.state.saved[layer]
        if name == "random":
            return S.random_score(rows, T, cfg_rows, x.device)
        if name == "compress":
            return 0.5 * S.random_score(rows, T, cfg_rows, x.device, on_cpu=True) + 0.5 * self.state.saved[layer]
        if name == "norm":
            return S.norm_score(x)
        if name == "similarity":
            return S.similarity_score(x, self.state.cached)
        return torch.ones(rows, T, device=x.device)  # straight
