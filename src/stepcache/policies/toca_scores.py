"""Token scores of ToCa (Zou et al., "Accelerating Diffusion Transformers with Token-wise Feature
Caching", arXiv 2410.05317, ICLR 2025, Sec. 3.3): which tokens a partial step recomputes.

Every function returns a score per token (rows, T); a higher score means "recompute first". The
arithmetic follows the reference implementation's order of float operations, so that the tokens
it selects are the same bit for bit:

- ``attention`` (s1): L2-normalised attention each token RECEIVES (column sums of the head-mean
  softmax map of the last full step).
- ``kv-norm``: L2-normalised ``sum over heads of (1 - ||v||)`` from the last full step; needs no
  attention map, so full steps keep fused SDPA attention.
- ``norm``: L2-normalised norm of the current input tokens.
- ``similarity``: L2-normalised ``1 - cos(x, cached MLP output)`` (the reference compares the
  block's current MLP-branch input with the cached MLP output).
- ``random``: uniform, the same for the cond and uncond halves under CFG.
- ``compress``: ``0.5 * random + 0.5 * column sums / their max``.
- ``straight``: all ones (ties everywhere; argsort decides).
- ``entropy_score`` (s2, PixArt variant's ``attention``): L2-normalised ``1 + entropy`` of each
  image token's cross-attention over the text tokens (:func:`cross_entropy`), the CFG halves'
  maps averaged first (over the packed text of the batch, as the references do).

Then s3 (staleness) and s4 (the spatial-uniformity bonus) are added: :func:`with_staleness`,
:func:`spatial_bonus`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCORES = ("attention", "random", "similarity", "norm", "kv-norm", "compress", "straight")
MAP_SCORES = ("attention", "compress")  # need the explicit softmax map of full steps
RANDOM_SCORES = ("random", "compress")  # draw from the global RNG at every partial step


def attention_received(attn_map: torch.Tensor) -> torch.Tensor:
    """s1: attn_map (B, T, T) head-mean softmax -> (B, T) L2-normalised column sums (eps 1e-12)."""
    return F.normalize(attn_map.sum(dim=1), dim=1, p=2)


def attention_over_max(attn_map: torch.Tensor) -> torch.Tensor:
    """The ``compress`` attention part: column sums (B, T) divided by each row's maximum."""
    received = attn_map.sum(dim=1)  # (B, T)
    return received / received.max(dim=1, keepdim=True)[0]


def cross_entropy(cross_map: torch.Tensor, cfg: bool, own_text: bool = False) -> torch.Tensor:
    """Entropy over the text tokens of head-mean cross-attention maps (B, T, L) -> (B, T), or under
    CFG of the two halves' average (0.5 each) -> (B/2, T): ``-sum p log(p + 1e-7)``. Rows are
    independent, so the entropy of some tokens' rows can be refreshed alone (partial steps).

    The references average maps over the PACKED text of the whole batch (B, T, Ltot): each row is zero
    outside its own caption's columns, so the "average" of the two halves holds both halves' maps side
    by side, each weighted 0.5, and its entropy is ``H(p_u / 2) + H(p_c / 2)``, not the entropy of the
    mixture. ``own_text``: the maps are over each row's own L text tokens (diffusers); the halves are then
    laid side by side (B/2, T, 2 L) to compute the same number."""
    m = cross_map
    if cfg:
        first, second = torch.split(m, m.shape[0] // 2, dim=0)
        m = torch.cat([0.5 * first, 0.5 * second], dim=-1) if own_text else 0.5 * first + (1 - 0.5) * second
    return -torch.sum(m * torch.log(m + 1e-7), dim=-1)


def entropy_score(entropy: torch.Tensor, cfg: bool) -> torch.Tensor:
    """s2 from :func:`cross_entropy` (rows, T): ``l2_normalize(1 + H)``, repeated for both CFG halves."""
    score = F.normalize(1 + entropy, dim=1, p=2)
    return score.repeat(2, 1) if cfg else score


def value_norm_score(value_norms: torch.Tensor) -> torch.Tensor:
    """``kv-norm``: per-head value norms (B, H, T) -> (B, T) L2-normalised sum over heads of 1 - ||v||."""
    return F.normalize((1 - value_norms).sum(dim=-2), dim=1, p=2)


def norm_score(x: torch.Tensor) -> torch.Tensor:
    """``norm``: x (B, T, D) -> (B, T) L2-normalised token norms."""
    return F.normalize(x.norm(dim=-1, p=2), dim=-1, p=2)


def similarity_score(x: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """``similarity``: x, cached (B, T, D) -> (B, T) L2-normalised cosine distance."""
    return F.normalize(1 - F.cosine_similarity(x, cached, dim=-1), dim=-1, p=2)


def random_score(rows: int, num_tokens: int, cfg: bool, device, on_cpu: bool = False) -> torch.Tensor:
    """Uniform scores (rows, T) from the global RNG; under CFG one draw shared by both halves.

    ``on_cpu`` draws on the CPU generator then moves the result (the reference's ``compress``).
    """
    n = rows // 2 if cfg else rows
    draw = torch.rand(n, num_tokens) if on_cpu else torch.rand(n, num_tokens, device=device)
    return (torch.cat([draw, draw], dim=0) if cfg else draw).to(device)


def with_staleness(score: torch.Tensor, counter: torch.Tensor, weight: float, interval: int) -> torch.Tensor:
    """s3: score + weight * counter / N; counter (B, T) int counts partial steps since a token's refresh."""
    return score + weight * (counter.float() / interval)


def spatial_bonus(score: torch.Tensor, grid: tuple[int, int], ratio: float, block: int = 2) -> torch.Tensor:
    """s4: in every non-overlapping ``block`` x ``block`` cell of the token grid (row-major tokens),
    the arg-max token gets ``+ max * ratio``. score (B, T) -> (B, T)."""
    rows, T = score.shape
    h, w = grid
    if T > h * w:  # extra tokens come first (U-ViT's label and time tokens): the bonus covers the patches only
        extra = T - h * w
        return torch.cat([score[:, :extra], spatial_bonus(score[:, extra:], grid, ratio, block)], dim=1)
    cells = score.view(rows, h // block, block, w // block, block).permute(0, 1, 3, 2, 4)
    cells = cells.contiguous().view(rows, -1, block * block)  # (B, cells, block^2)
    top, where = cells.max(dim=-1, keepdim=True)  # (B, cells, 1)
    mask = torch.zeros_like(cells).scatter_(-1, where, 1)
    cells = cells + mask * top * ratio
    out = cells.view(rows, h // block, w // block, block, block).permute(0, 1, 3, 2, 4)
    return out.contiguous().view(rows, T)
