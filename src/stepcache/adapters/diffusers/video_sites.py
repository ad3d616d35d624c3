"""Site kinds for the attention modules of the diffusers video transformers (Wan 2.1, LTX-Video).

``WanAttention`` and ``LTXAttention`` are not diffusers' standard ``Attention``: their q/k RMSNorm runs
over all heads at once (before the head split) and their self-attention rotates q and k with a 3-D RoPE
(Wan after the head split, on interleaved pairs; LTX before it, on (real, imag) pairs). The branch
outputs always come from diffusers' own processors (so a policy that computes everything is bit-identical
to the plain model); only the attention *maps* a score asks for are computed here, beside them, with the
same normalisation and rotation:

- ``rope_self`` (Wan ``attn1``, LTX ``attn1``): Compute/Reuse, with a head-mean map (B, T, T) or the value
  norms (B, H, T) of the image tokens.
- ``qk_cross`` (``attn2``): cross-attention of the image queries to the text tokens; ``Partial(index)`` runs
  the processor on the k chosen queries; a map is (B, T, L) (or (B, k, L) for the chosen queries), the
  text padding mask applied as the processor applies it.

MACs are exact per call: query and output projections per image query, the key and value projections
once per call on the L text tokens, and the two attention products (2 * queries * keys * inner).
"""

from __future__ import annotations

import torch

from stepcache.adapters.base import gather_tokens
from stepcache.adapters.diffusers.common import SITE_KINDS, _attention_macs, _call_args, _call_with, value_norms
from stepcache.errors import ConfigError


def video_grid(frames: int, height: int, width: int) -> tuple[int, tuple[int, int]]:
    """(tokens, grid) of a video of ``frames`` x ``height`` x ``width`` tokens, frame-major. The grid stacks the
    frames vertically, (frames * height, width): a policy's square cells (ToCa's spatial bonus) then stay
    inside one frame whenever ``height`` is a multiple of the cell side. (The blocks attend over all frames at
    once, so one sequence per row: no per-frame ``LayerGroup``.)"""
    return frames * height * width, (frames * height, width)


def rope_wan(x: torch.Tensor, rotary) -> torch.Tensor:
    """Wan's rotation of q or k (B, N, H, hd) by (cos, sin) (1, N, 1, hd), on interleaved (even, odd) pairs."""
    cos, sin = rotary
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, N, H, hd / 2)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out


def rope_ltx(x: torch.Tensor, rotary) -> torch.Tensor:
    """LTX's rotation of q or k (B, N, H * hd) by (cos, sin) (B, N, H * hd): x cos + rot90(x) sin, in float32."""
    cos, sin = rotary
    real, imag = x.unflatten(2, (-1, 2)).unbind(-1)  # (B, N, H * hd / 2) each
    rotated = torch.stack([-imag, real], dim=-1).flatten(2)  # (B, N, H * hd)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


ROPES = {"wan": (rope_wan, True, "rotary_emb"), "ltx": (rope_ltx, False, "image_rotary_emb")}


def qk_rms_weights(attn, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   rotary=None, rope: str | None = None) -> torch.Tensor:
    """Per-head softmax weights (B, H, T, N) of queries x (B, T, D) over keys from ``context`` (B, N, Dc) (x
    itself if None) of a Wan/LTX attention: RMSNorm over all heads, then the family's RoPE, scale hd^-1/2;
    ``mask`` is the additive bias (B, 1, N) the LTX processor takes. In float32 (a score, not an output)."""
    if getattr(attn, "add_k_proj", None) is not None:
        raise ConfigError("Image-conditioned Wan cross-attention (added k/v projections) has no single text "
                          "attention map; use ToCa score='kv-norm'.")
    ctx = x if context is None else context
    q, k = attn.norm_q(attn.to_q(x)), attn.norm_k(attn.to_k(ctx))  # (B, T, H*hd), (B, N, H*hd)
    fn, on_heads, _ = ROPES[rope] if rope else (None, False, None)
    if rotary is not None and fn is not None and not on_heads:
        q, k = fn(q, rotary), fn(k, rotary)
    q, k = q.unflatten(2, (attn.heads, -1)), k.unflatten(2, (attn.heads, -1))  # (B, N, H, hd)
    if rotary is not None and fn is not None and on_heads:
        q, k = fn(q, rotary), fn(k, rotary)
    q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()  # (B, H, N, hd)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, N)
    if mask is not None:
        B = x.shape[0]
        bias = attn.prepare_attention_mask(mask, k.shape[2], B)
        scores = scores + bias.view(B, attn.heads, -1, bias.shape[-1]).float()
    return scores.softmax(dim=-1)


def qk_rms_map(attn, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               rotary=None, rope: str | None = None) -> torch.Tensor:
    """The head-mean map (B, T, N) of :func:`qk_rms_weights`."""
    return qk_rms_weights(attn, x, context, mask, rotary, rope).mean(dim=1)


def _linear(m) -> int:
    return m.in_features * m.out_features


def _cross_macs(module, geom):
    per_query = _linear(module.to_q) + _linear(module.to_out[0])
    per_key = _linear(module.to_k) + _linear(module.to_v)
    if getattr(module, "add_k_proj", None) is not None:  # Wan I2V: the image tokens' k/v as well
        per_key += _linear(module.add_k_proj) + _linear(module.add_v_proj)
    inner = module.inner_dim

    def macs(k: int) -> int:
        L = geom.text_len
        return k * per_query + 2 * k * L * inner + (L * per_key if k else 0)

    return macs


def _rope_self_site(rope: str):
    def make(original, module, site, layer, handle, geom):
        macs = _attention_macs(module, geom, True, lambda: geom.num_tokens)
        rotary_arg = ROPES[rope][2]

        def forward(*args, **kwargs):
            full = lambda: original(*args, **kwargs)  # noqa: E731

            def with_map():  # binds the call only when a map is asked for
                call = _call_args(original, args, kwargs)
                x = call.arguments["hidden_states"]  # (B, T, D)
                return full(), qk_rms_map(module, x, None, None, call.arguments.get(rotary_arg), rope)

            def with_values():
                x = _call_args(original, args, kwargs).arguments["hidden_states"]
                return full(), value_norms(module, x)

            return handle.branch(layer, site.branch, full=full, macs=macs, with_map=with_map, with_values=with_values)

        forward.site_macs = macs
        return forward

    return make


def _qk_cross_site(original, module, site, layer, handle, geom):
    macs = _cross_macs(module, geom)

    def forward(*args, **kwargs):
        call = _call_args(original, args, kwargs)
        x = call.arguments["hidden_states"]  # (B, T, D) image queries
        ctx, mask = call.arguments.get("encoder_hidden_states"), call.arguments.get("attention_mask")

        def on(index):  # only the queries ``index`` (B, k), through diffusers' own processor
            return _call_with(original, call, "hidden_states", gather_tokens(x, index))

        def on_with_map(index):  # the same and the map rows of those queries (B, k, L)
            q = gather_tokens(x, index)
            return _call_with(original, call, "hidden_states", q), qk_rms_map(module, q, ctx, mask)

        full = lambda: original(*args, **kwargs)  # noqa: E731
        return handle.branch(layer, site.branch, full=full, tokens=on, macs=macs, x=x,
                             with_map=lambda: (full(), qk_rms_map(module, x, ctx, mask)),
                             tokens_with_map=on_with_map)

    forward.site_macs = macs
    return forward


SITE_KINDS.update({"wan_self": _rope_self_site("wan"), "ltx_self": _rope_self_site("ltx"), "qk_cross": _qk_cross_site})
