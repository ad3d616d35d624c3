"""ToCa's OpenSora v1.2 variant (Zou et al., arXiv 2410.05317, ICLR 2025; the reference's ``Open-Sora``
folder): token-wise caching on STDiT3, chosen by ``stepcache.ToCa()`` when the model is an STDiT3.

Every block (28 spatial + 28 temporal, numbered ``2 l`` and ``2 l + 1`` by the adapter) has three sites:
self-attention ``attn``, cross-attention ``cross`` and ``mlp``. Steps count UP (``k = S - 1 - i``). Each
site has its own refresh period, hard-coded in the reference (``interval`` does not set them)::

    full(site, k) = k <= 2 or k % P[site] == 0        P = 3 (attn), 6 (cross), 3 (mlp)

On other steps self-attention reuses its cached un-gated output; cross-attention and the MLP recompute their
own top-k tokens, ``k = int(float32(clamp(ratio)) * N)`` over ALL T*S tokens of a row (global, not per frame),
and scatter them into the cache. The default "ToCa" schedule gives ratio ``fresh_ratio * 1.495`` for the MLP
and ``fresh_ratio * (-0.005)`` -> 0 tokens for cross-attention (its whole cache is reused).

Score (``attention``, in fact s2): the head-mean cross-attention map of the block's last full computation (or
its recomputed rows), the CFG halves averaged, ``l2_normalize(1 + entropy)``, the same for both halves (only the
per-token entropy is kept, not the (rows, N, Ltot) maps: the same numbers, a fraction of the memory); then
staleness ``+ 0.25 * counter / interval``, one counter per site (zeroed at a full computation, +1 at each cut,
picked tokens back to 0). No spatial bonus (the reference's call is commented out). Other reference scores:
``random``, ``straight``, ``norm`` and ``similarity`` (both on the site's input: x for cross-attention, the
modulated LN(x) for the MLP); ``compress`` and ``kv-norm`` do not exist for this model in the reference.
``fresh_ratio = 0`` gives per-site FORA (periods 3/3/6/3, the first three steps full).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from stepcache.errors import ConfigError
from stepcache.policies import toca_scores as S
from stepcache.core.context import ModelInfo
from stepcache.core.policy import Policy
from stepcache.core.actions import COMPUTE, COMPUTE_WITH_MAP, REUSE, Partial

PERIODS = {"attn": 3, "cross": 6, "mlp": 3}  # the reference's per-module force-activation cycles
FIRST_FULL = 3  # steps 0, 1, 2 compute everything
FRESH_RATIO = 0.1  # the default when ToCa(fresh_ratio=None)
SCHEDULES = ("constant", "linear", "exp", "linear-mode", "layerwise")  # unset (None): the reference's "ToCa"
SCORES = ("attention", "random", "straight", "norm", "similarity")


def resolve(cfg):
    """The ToCa config with the OpenSora defaults for unset settings (``schedule=None`` stands for the
    reference's "ToCa" schedule); refuses what the reference lacks."""
    cfg = replace(cfg, variant="opensora", fresh_ratio=FRESH_RATIO if cfg.fresh_ratio is None else cfg.fresh_ratio)
    if cfg.forecast:
        raise ConfigError("ToCa forecast=True is a composition of the DiT rules, not available on OpenSora.")
    if cfg.schedule is not None and cfg.schedule not in SCHEDULES:
        raise ConfigError(f"ToCa schedule {cfg.schedule!r} does not exist for OpenSora; leave it unset (the "
                          f"reference's 'ToCa' schedule) or choose one of {', '.join(SCHEDULES)}.")
    if cfg.score not in SCORES:
        raise ConfigError(f"ToCa score {cfg.score!r} is not available for OpenSora; choose one of {', '.join(SCORES)}.")
    if cfg.bonus:
        raise ConfigError("ToCa's OpenSora variant has no spatial bonus (the reference disables s4); set bonus=0.")
    return cfg


def is_full(site: str, k: int) -> bool:
    """Whether ``site`` ("attn", "cross", "mlp") computes every token at step k (counting up)."""
    return k < FIRST_FULL or k % PERIODS[site] == 0


def ratio(cfg, site: str, k: int, num_steps: int, layer: int, depth: int) -> float:
    """Recomputed share of ``site`` at step k for block ``layer`` of its kind (Python float, reference op order)."""
    r, w = cfg.fresh_ratio, 0.9
    if cfg.schedule is None:  # the reference's "ToCa" schedule
        step_weight, layer_weight, type_weight = 0.0, 0.0, 0.0
        module_weight, module_time_weight = 1.5, 0.33
        step_factor = 1 + step_weight - 2 * step_weight * k / num_steps
        layer_factor = 1 + layer_weight - 2 * layer_weight * layer / max(depth - 1, 1)
        module_factor = (1 - (1 - module_time_weight) * module_weight if site == "cross"
                         else 1 + module_time_weight * module_weight)  # -0.005 cross, 1.495 MLP
        return r * layer_factor * step_factor * module_factor * (1 + type_weight)
    if cfg.schedule == "constant":
        return r
    if cfg.schedule == "linear":
        return r * (1 + w - 2 * w * k / num_steps)
    if cfg.schedule == "exp":
        return r * (w ** (k / num_steps))
    if cfg.schedule == "layerwise":
        return r * (1 + w - 2 * w * layer / max(depth - 1, 1))
    mode = (k % cfg.interval) / cfg.interval - 0.5  # linear-mode
    return r * (1 + w - 2 * w * k / num_steps + 0.1 * mode)


def tokens_for(share: float, num_tokens: int) -> int:
    """k = int(float32(clamp(float32(share), 0, 1)) * N), the product rounded in float32 as the reference."""
    return int(np.clip(np.float32(share), np.float32(0), np.float32(1)) * np.float32(num_tokens))


def schedule_table(cfg, num_steps: int, num_tokens: int, depth: int = 28) -> dict:
    """Per step k: tokens per row computed by each site kind (layer 0 of each kind; "ToCa" is layer-free)."""
    cfg = resolve(cfg)
    table = {}
    for k in range(num_steps):
        row = {}
        for site in ("attn", "cross", "mlp"):
            if is_full(site, k):
                row[site] = num_tokens
            elif site == "attn":
                row[site] = 0
            else:
                row[site] = tokens_for(ratio(cfg, site, k, num_steps, 0, depth), num_tokens)
        table[k] = row
    return table


class OpenSoraToCaState:
    """Per model call of a step: staleness counters, per-block cross-attention entropy, the site input."""

    def __init__(self):
        self.counters: dict = {}
        self.entropy: dict[int, torch.Tensor] = {}  # per block: cross-attention entropy of each token
        self.x = self.cached = None


class OpenSoraToCaPolicy(Policy):
    """Per-run state: a staleness counter (rows, N) int32 per (block, site) and, for the ``attention`` score,
    each block's per-token cross-attention entropy from its last full computation (rows refreshed by partial
    cross-attention), the CFG halves averaged as the reference scores them."""

    needs_input = ("mlp", "cross")  # scored from the site input; "attn" may be decided ahead

    def __init__(self, config, info: ModelInfo):
        super().__init__(resolve(config), info)

    def new_call_state(self) -> OpenSoraToCaState:
        return OpenSoraToCaState()

    def decide(self, ctx, site_key, view):
        layer, branch = site_key.layer, site_key.name
        if branch in self.needs_input:
            self.state.x, self.state.cached = view.input, view.cached  # (B, N, D) each
        k = ctx.num_steps - 1 - ctx.i
        site = branch if branch in PERIODS else "attn"
        if is_full(site, k):
            if branch in ("cross", "mlp"):
                self.state.counters[(layer, branch)] = None  # all zero
            want_map = branch == "cross" and self.config.score == "attention"
            return COMPUTE_WITH_MAP if want_map else COMPUTE
        if site == "attn":
            return REUSE
        index = self.select(ctx, layer, branch, k)
        return Partial(index, need_map=branch == "cross" and self.config.score == "attention")

    def observe(self, ctx, site_key, result) -> None:
        """Keep the score's per-token entropy (rows/2 or rows, N) instead of the map (rows, N, Ltot): the
        entropy of a token depends on its map row only, so recomputed rows refresh their own entries."""
        layer, branch, attn_map, index = site_key.layer, site_key.name, result.attn_map, result.index
        if branch != "cross" or attn_map is None:
            return
        cfg_rows = bool(self.run is not None and self.run.cfg)
        fresh = S.cross_entropy(attn_map, cfg_rows)  # (rows/2 or rows, N or k)
        entropy = self.state.entropy
        if index is None:  # a full computation
            entropy[layer] = fresh
        else:  # the recomputed queries, the same tokens in both CFG halves
            entropy[layer].scatter_(1, index[: fresh.shape[0]], fresh.to(entropy[layer].dtype))

    # ------------------------------------------------------------------ token selection
    def select(self, ctx, layer: int, branch: str, k: int) -> torch.Tensor:
        """Top-k indices (rows, k) of the site's tokens; bumps the site's staleness counter."""
        x = self.state.x
        rows, N = x.shape[0], x.shape[1]
        depth = max(self.info.depth // 2, 1)
        count = tokens_for(ratio(self.config, branch, k, ctx.num_steps, layer // 2, depth), N)
        counter = self.state.counters.get((layer, branch))
        if counter is None:
            counter = torch.zeros(rows, N, dtype=torch.int32, device=x.device)
            self.state.counters[(layer, branch)] = counter
        score = S.with_staleness(self.base_score(layer, x), counter, self.config.staleness_weight, self.config.interval)
        index = score.argsort(dim=-1, descending=True)[:, :count]  # global over the T*S tokens of each row
        counter += 1
        counter.scatter_(1, index, 0)
        return index

    def base_score(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        name, rows, N = self.config.score, x.shape[0], x.shape[1]
        cfg_rows = bool(self.run is not None and self.run.cfg)
        if name == "attention":
            return S.entropy_score(self.state.entropy[layer], cfg_rows)
        if name == "random":
            return S.random_score(rows, N, cfg_rows, x.device)
        if name == "norm":
            return S.norm_score(x)
        if name == "similarity":
            return S.similarity_score(x, self.state.cached)
        return torch.ones(rows, N, device=x.device)  # straight


def ideal_speedup(macs: dict, depth: int, num_steps: int, num_tokens: int, cfg, embeddings: bool = True) -> float:
    """Uncached over executed multiply-adds of a run under the variant's schedule, from an adapter's per-row
    ``macs`` (``stepcache.adapters.stdit3.stdit3_macs``); ``depth`` blocks of each kind. Layer-free schedules
    only ("ToCa", constant, linear, exp, linear-mode): the per-step counts come from :func:`schedule_table`.
    ``embeddings=False`` leaves out the embeddings and final layer: the spec's compute model (projections,
    attention cores, MLP and the text k|v, which always runs)."""
    fixed = macs["fixed"] if embeddings else macs["text_kv"]
    table = schedule_table(cfg, num_steps, num_tokens, depth)
    full = executed = 0
    for row in table.values():
        for layer in range(2 * depth):
            for site in ("attn", "cross", "mlp"):
                full += macs[site](layer, num_tokens)
                executed += macs[site](layer, row[site])
        full += fixed
        executed += fixed
    return full / executed
