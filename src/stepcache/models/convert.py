"""Convert between stepcache's native :class:`~stepcache.models.dit.DiT` and diffusers' ``DiTTransformer2DModel``.

The two hold the same network (Peebles & Xie, arXiv 2212.09748) laid out differently:

- native ``blocks.l.attn.qkv`` (3D, D) is diffusers' ``attn1.to_q / to_k / to_v`` stacked in that order;
  ``attn.proj`` is ``attn1.to_out.0``; ``mlp.fc1 / fc2`` are ``ff.net.0.proj / ff.net.2``;
  ``adaLN_modulation.1`` is ``norm1.linear`` (same chunk order: shift, scale, gate for attention, then MLP).
- native has ONE timestep/label embedder; diffusers gives EVERY block its own copy inside
  ``norm1.emb`` (``CombinedTimestepLabelEmbeddings``) and reuses block 0's for the final layer.
- ``final_layer.adaLN_modulation.1 / linear`` are ``proj_out_1 / proj_out_2``.
- the 2-D sin-cos table is a persistent buffer natively and a non-persistent one in diffusers.

Two behavioural traps, both fixed here and checked by the tests:

1. Timestep frequencies. DiT embeds t with frequencies ``exp(-ln(10^4) k / half)``; diffusers'
   ``CombinedTimestepLabelEmbeddings`` builds ``Timesteps(downscale_freq_shift=1)``, i.e. divides by
   ``half - 1``. Every block's embedder (and thus the final layer's) then sees another embedding: on the
   embedded digits model DDIM-50 latents differ by up to ~0.7. The shift is a plain attribute, not a config
   field, so :func:`dit_to_diffusers` sets it to 0 on every embedder, and a model reloaded with
   ``from_pretrained`` needs :func:`set_frequency_shift` again.
2. LayerNorm epsilon. The native blocks use 1e-6; diffusers' ``DiTTransformer2DModel`` defaults ``norm_eps``
   to 1e-5 for its MLP norm (``norm3``; ``norm1`` inside ``AdaLayerNormZero`` is fixed at 1e-6). The
   converted config says 1e-6.

Outputs agree to float rounding: diffusers runs three q/k/v matmuls where the native model runs one fused
qkv matmul, which a BLAS may block and accumulate differently (on the CPU of our measurements the outputs
were bit-identical; ``tests/test_convert.py`` allows 1e-5 relative). diffusers -> native -> diffusers is exact.
"""

from __future__ import annotations

import torch

from stepcache.errors import ConfigError, ModelMismatchError
from stepcache.models.dit import DiT

NATIVE_EPS = 1e-6          # every LayerNorm of the native DiT
DIFFUSERS_LABEL_DROPOUT = 0.1  # diffusers' CombinedTimestepLabelEmbeddings always builds a null-label row


# ------------------------------------------------------------------------------------------- configs
def diffusers_config(model: DiT) -> dict:
    """``DiTTransformer2DModel`` keyword arguments that build the same network as ``model``."""
    cfg = model.config
    if float(cfg.mlp_ratio) != 4.0:
        raise ConfigError(f"diffusers' DiT has a fixed MLP ratio of 4; this model has mlp_ratio {cfg.mlp_ratio}.")
    return dict(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
                in_channels=cfg.in_channels, out_channels=model.out_channels, num_layers=cfg.depth, dropout=0.0,
                attention_bias=True, sample_size=cfg.input_size, patch_size=cfg.patch_size,
                activation_fn="gelu-approximate", num_embeds_ada_norm=cfg.num_classes, norm_type="ada_norm_zero",
                norm_elementwise_affine=False, norm_eps=NATIVE_EPS)


def native_config(transformer) -> dict:
    """:class:`DiT` keyword arguments that build the same network as a ``DiTTransformer2DModel``."""
    c = transformer.config
    if c.norm_type != "ada_norm_zero" or c.activation_fn != "gelu-approximate" or c.norm_elementwise_affine:
        raise ModelMismatchError(
            f"Only adaLN-Zero DiTs with tanh-GELU and no norm affine convert; got norm_type {c.norm_type!r}, "
            f"activation {c.activation_fn!r}, norm_elementwise_affine {c.norm_elementwise_affine}.")
    out = transformer.out_channels
    if out not in (c.in_channels, 2 * c.in_channels):
        raise ModelMismatchError(f"out_channels must be in_channels or twice it (learned sigma), got {out}.")
    return dict(input_size=c.sample_size, patch_size=c.patch_size, in_channels=c.in_channels,
                hidden_size=c.num_attention_heads * c.attention_head_dim, depth=c.num_layers,
                num_heads=c.num_attention_heads, mlp_ratio=4.0, class_dropout_prob=DIFFUSERS_LABEL_DROPOUT,
                num_classes=c.num_embeds_ada_norm, learn_sigma=out == 2 * c.in_channels)


# ------------------------------------------------------------------------------------------- state dicts
def _block_pairs(l: int) -> list[tuple[str, str]]:
    """(native key, diffusers key) of block l's one-to-one tensors."""
    n, d = f"blocks.{l}.", f"transformer_blocks.{l}."
    pairs = [("attn.proj", "attn1.to_out.0"), ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2"),
             ("adaLN_modulation.1", "norm1.linear")]
    return [(n + a + s, d + b + s) for a, b in pairs for s in (".weight", ".bias")]


def _shared_pairs() -> list[tuple[str, str]]:
    pairs = [("x_embedder.proj", "pos_embed.proj"), ("final_layer.adaLN_modulation.1", "proj_out_1"),
             ("final_layer.linear", "proj_out_2")]
    return [(a + s, b + s) for a, b in pairs for s in (".weight", ".bias")]


def _embedder_pairs(l: int) -> list[tuple[str, str]]:
    """(native key, diffusers key of block l's private copy) of the timestep and label embedders."""
    e = f"transformer_blocks.{l}.norm1.emb."
    return [("t_embedder.mlp.0.weight", e + "timestep_embedder.linear_1.weight"),
            ("t_embedder.mlp.0.bias", e + "timestep_embedder.linear_1.bias"),
            ("t_embedder.mlp.2.weight", e + "timestep_embedder.linear_2.weight"),
            ("t_embedder.mlp.2.bias", e + "timestep_embedder.linear_2.bias"),
            ("y_embedder.embedding_table.weight", e + "class_embedder.embedding_table.weight")]


def native_to_diffusers_state(state: dict, depth: int, num_classes: int) -> dict:
    """A native DiT state dict -> a ``DiTTransformer2DModel`` state dict (without the non-persistent
    position table). A label table without a null row (``class_dropout_prob`` 0) gets a zero one."""
    out = {d: state[n] for n, d in _shared_pairs()}
    table = state["y_embedder.embedding_table.weight"]  # (num_classes [+1], D)
    if table.shape[0] == num_classes:
        table = torch.cat([table, torch.zeros_like(table[:1])], dim=0)
    for l in range(depth):
        out.update({d: state[n] for n, d in _block_pairs(l)})
        q, k, v = state[f"blocks.{l}.attn.qkv.weight"].chunk(3, dim=0)  # each (D, D)
        qb, kb, vb = state[f"blocks.{l}.attn.qkv.bias"].chunk(3, dim=0)
        a = f"transformer_blocks.{l}.attn1."
        out.update({a + "to_q.weight": q, a + "to_k.weight": k, a + "to_v.weight": v,
                    a + "to_q.bias": qb, a + "to_k.bias": kb, a + "to_v.bias": vb})
        for n, d in _embedder_pairs(l):
            out[d] = table if n.startswith("y_embedder") else state[n]
    return {k: v.clone() for k, v in out.items()}


def diffusers_to_native_state(state: dict, depth: int) -> dict:
    """A ``DiTTransformer2DModel`` state dict -> a native DiT state dict (without ``pos_embed``).

    The native model has one embedder: every block's private copy must be equal to block 0's, else the
    two models cannot compute the same function and :class:`ModelMismatchError` says which differs.
    """
    out = {n: state[d] for n, d in _shared_pairs()}
    for l in range(depth):
        out.update({n: state[d] for n, d in _block_pairs(l)})
        a = f"transformer_blocks.{l}.attn1."
        out[f"blocks.{l}.attn.qkv.weight"] = torch.cat([state[a + f"to_{p}.weight"] for p in "qkv"], dim=0)
        out[f"blocks.{l}.attn.qkv.bias"] = torch.cat([state[a + f"to_{p}.bias"] for p in "qkv"], dim=0)
        for n, d in _embedder_pairs(l):
            if l == 0:
                out[n] = state[d]
            elif not torch.equal(state[d], out[n]):
                raise ModelMismatchError(f"Block {l}'s {d.split('.emb.')[1]} differs from block 0's; the native "
                                         "DiT shares one timestep/label embedder across blocks.")
    return {k: v.clone() for k, v in out.items()}


# ------------------------------------------------------------------------------------------- models
def frequency_shifts(transformer) -> list[float]:
    """``downscale_freq_shift`` of every block's timestep embedder (DiT's own embedding needs 0)."""
    return [float(b.norm1.emb.time_proj.downscale_freq_shift) for b in transformer.transformer_blocks]


def set_frequency_shift(transformer, shift: float = 0.0):
    """Set every block's timestep-embedder frequency shift (0 = DiT's embedding); returns the model."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = shift
    return transformer


def dit_to_diffusers(model: DiT):
    """A ``DiTTransformer2DModel`` computing what ``model`` computes (same dtype, device, train/eval mode)."""
    from diffusers import DiTTransformer2DModel

    p = next(model.parameters())
    cfg = model.config
    tr = DiTTransformer2DModel(**diffusers_config(model))
    state = native_to_diffusers_state(model.state_dict(), cfg.depth, cfg.num_classes)
    tr.load_state_dict(state, strict=True)
    tr.pos_embed.pos_embed.copy_(model.pos_embed)  # (1, T, D); diffusers' own table agrees to float32 rounding
    set_frequency_shift(tr, 0.0)
    return _like(tr, p).train(model.training)


def diffusers_to_dit(transformer, exact: bool = True) -> DiT:
    """A native :class:`DiT` with the weights of a ``DiTTransformer2DModel``.

    ``exact=True`` refuses a source whose outputs the native model cannot reproduce (a timestep frequency
    shift other than 0, or a LayerNorm epsilon other than 1e-6, as a freshly loaded hub checkpoint has);
    ``exact=False`` converts the weights anyway, giving the network as DiT's authors run it.
    """
    shifts = frequency_shifts(transformer)
    eps = float(transformer.config.norm_eps)
    if exact and (any(s != 0.0 for s in shifts) or eps != NATIVE_EPS):
        raise ModelMismatchError(
            f"This DiTTransformer2DModel embeds timesteps with frequency shift {max(shifts, key=abs):g} and norm_eps "
            f"{eps:g} where the native DiT uses 0 and 1e-6; call set_frequency_shift(model, 0) and build it with "
            "norm_eps=1e-6, or pass exact=False to convert the weights anyway.")
    p = next(transformer.parameters())
    kwargs = native_config(transformer)
    model = DiT(**kwargs)
    state = diffusers_to_native_state(transformer.state_dict(), kwargs["depth"])
    state["pos_embed"] = transformer.pos_embed.pos_embed.detach().clone()
    model.load_state_dict(state, strict=True)
    return _like(model, p).train(transformer.training)


def _like(module, p: torch.Tensor):
    """``module`` on ``p``'s device and dtype (no cast call when already float32: diffusers warns on it)."""
    module = module.to(device=p.device)
    return module if p.dtype == torch.float32 else module.to(dtype=p.dtype)
