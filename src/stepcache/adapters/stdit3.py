"""Adapter for stepcache's native STDiT3 (OpenSora v1.2): 28 spatial + 28 temporal blocks, each with three sites
(gated self-attention ``attn``, un-gated cross-attention ``cross``, gated ``mlp``).

Sites are numbered by block in execution order: spatial block l is layer ``2 l``, temporal block l is layer
``2 l + 1``. Token geometry per group (declared here, not in the runtime): every site sees the B rows of N =
T * S tokens, frame-major; a spatial self-attention attends within T groups (frames) of S tokens, a temporal
one within S groups (positions) of T tokens; cross-attention and the MLP are per token. The number of tokens
depends on the video size, so the model-call hook publishes it before the blocks run.
"""

from __future__ import annotations

import math
from dataclasses import replace

from stepcache.adapters.base import Adapter, gather_tokens, register_adapter
from stepcache.models.stdit3 import STDiT3, STDiT3Block
from stepcache.core.context import ModelInfo
from stepcache.core.hooks import ForwardPatch


def token_groups(layer: int, T: int, S: int) -> tuple[int, int]:
    """(groups, tokens per group) of the self-attention of ``layer``: frames for spatial, positions for temporal."""
    return (S, T) if layer % 2 else (T, S)


def stdit3_macs(config: dict, T: int, Hp: int, Wp: int, text_len: float) -> dict:
    """Multiply-accumulates per batch row and model call. ``attn``/``cross``/``mlp`` map (layer, k) -> work of k
    tokens; ``fixed`` is what every call does whatever the policy: ``embeddings`` (patches, timestep and fps,
    the caption MLP on all ``model_max_length`` rows, the final layer) plus ``text_kv``, the text k|v projection
    of every block (the reference runs it even when the cross-attention is reused). The attention cores count
    each row's own ``text_len`` tokens."""
    D, depth = config["hidden_size"], config["depth"]
    hidden = int(D * config["mlp_ratio"])
    patch = math.prod(config["patch_size"])
    out_channels = config["in_channels"] * (2 if config["pred_sigma"] else 1)
    S = Hp * Wp
    N = T * S
    embeddings = (N * config["in_channels"] * patch * D + 2 * (256 * D + D * D) + 6 * D * D
                  + config["model_max_length"] * (config["caption_channels"] * D + D * D)
                  + N * D * patch * out_channels)
    text_kv = 2 * depth * round(2 * text_len * D * D)
    return {
        "attn": lambda layer, k: (4 * N * D * D + 2 * N * token_groups(layer, T, S)[1] * D) * k // N,
        "cross": lambda layer, k: round(2 * k * D * D + 2 * k * text_len * D),
        "mlp": lambda layer, k: 2 * k * D * hidden,
        "fixed": embeddings + text_kv,
        "embeddings": embeddings,
        "text_kv": text_kv,
    }


@register_adapter
class STDiT3Adapter(Adapter):
    family = "stepcache.STDiT3"
    branches = ("attn", "cross", "mlp")

    def matches(self, model) -> bool:
        return isinstance(model, STDiT3)

    def info(self, model: STDiT3) -> ModelInfo:
        # num_tokens and grid are placeholders until the first call publishes the video's geometry
        return ModelInfo(depth=2 * model.depth, num_tokens=1, grid=(1, 1), branches=self.branches,
                         family=self.family, capabilities=frozenset({"attention_map"}), variant="opensora")

    def install(self, model: STDiT3, handle, patches: list) -> None:
        state = {}
        patches.append(ForwardPatch(model, lambda original: self._model_forward(model, original, handle, state)))
        for l, (spatial, temporal) in enumerate(zip(model.spatial_blocks, model.temporal_blocks)):
            for layer, block in ((2 * l, spatial), (2 * l + 1, temporal)):
                patches.append(ForwardPatch(block, lambda _o, n=layer, b=block: self._block_forward(b, n, handle,
                                                                                                   state)))

    @staticmethod
    def _model_forward(model: STDiT3, original, handle, state):
        def forward(x, timestep, y, mask=None, *args, **kwargs):
            T, Hp, Wp = model.grid(x)
            rows = x.shape[0]
            text_len = float(mask.sum()) / mask.shape[0] if mask is not None else y.shape[2]  # per row
            state["macs"] = stdit3_macs(model.config, T, Hp, Wp, text_len)
            publish_geometry(handle, T, Hp, Wp)
            handle.before_call(rows, rows * state["macs"]["fixed"])
            return original(x, timestep, y, mask, *args, **kwargs)

        return forward

    @staticmethod
    def _block_forward(block: STDiT3Block, layer: int, handle, state):
        def forward(x, text, t_mlp, T, S):  # (B, T*S, D) in both block kinds: spans of blocks apply as is
            macs = state["macs"]
            sites = tuple((name, lambda k, n=name: macs[n](layer, k)) for name in ("attn", "cross", "mlp"))
            return handle.block(layer, x, lambda: inner(x, text, t_mlp, T, S, macs), sites=sites)

        def inner(x, text, t_mlp, T, S, macs):
            shift1, scale1, gate1, shift2, scale2, gate2 = block.modulation(t_mlp)
            a = handle.branch(layer, "attn", full=lambda: block.attn_branch(x, shift1, scale1, T, S),
                              macs=lambda k: macs["attn"](layer, k), x=x)
            x = x + gate1 * a
            kv = block.cross_attn.text_kv(text.tokens)  # always, as the reference (counted as fixed work)
            cross = block.cross_attn
            c = handle.branch(
                layer, "cross",
                full=lambda: cross(x, kv, text.bias),
                with_map=lambda: cross(x, kv, text.bias, True),
                tokens=lambda index: cross(gather_tokens(x, index), kv, text.bias),
                tokens_with_map=lambda index: cross(gather_tokens(x, index), kv, text.bias, True),
                macs=lambda k: macs["cross"](layer, k), x=x,
            )
            x = x + c
            h = block.mlp_input(x, shift2, scale2)  # LN + modulate on all tokens (the reference's x_m)
            m = handle.branch(layer, "mlp", full=lambda: block.mlp(h),
                              tokens=lambda index: block.mlp(gather_tokens(h, index)),
                              macs=lambda k: macs["mlp"](layer, k), x=h)
            return x + gate2 * m

        return forward


def publish_geometry(handle, T: int, Hp: int, Wp: int) -> None:
    """Tell the handle (its ModelInfo, its handler and the run's statistics) how many tokens a row has."""
    info = replace(handle.info, num_tokens=T * Hp * Wp, grid=(Hp, Wp))
    if info != handle.info:
        handle.info = info
        handle.handler.info = info
    handle.stats().num_tokens = info.num_tokens
