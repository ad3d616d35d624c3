"""Adapter for stepcache's native DiT (adaLN-Zero blocks: gated attention, gated MLP)."""

from __future__ import annotations

import torch

from stepcache.adapters.base import Adapter, gather_tokens, register_adapter
from stepcache.adapters.lean import Lane, adaln_chunks, gated_add, hooked, skips
from stepcache.core.context import ModelInfo
from stepcache.core.hooks import ForwardPatch
from stepcache.models.dit import DiT, DiTBlock, modulate


def dit_macs(model: DiT) -> dict:
    """Multiply-accumulates per batch row: attention/MLP as functions of tokens computed, each block's
    adaLN modulation, and the fixed work of every call (embeddings, final layer)."""
    D = model.pos_embed.shape[-1]
    T = model.num_tokens
    H = model.blocks[0].mlp.fc1.out_features
    p, C = model.patch_size, model.in_channels
    freq = model.t_embedder.frequency_size
    fixed = T * p * p * C * D + freq * D + D * D + D * 2 * D + T * D * p * p * model.out_channels
    return {
        "attn": lambda k: (4 * T * D * D + 2 * T * T * D) * k // T,
        "mlp": lambda k: 2 * k * D * H,
        "block": D * 6 * D,
        "fixed": fixed,
    }


@register_adapter
class DiTAdapter(Adapter):
    family = "stepcache.DiT"
    branches = ("attn", "mlp")

    def matches(self, model) -> bool:
        return isinstance(model, DiT)

    def info(self, model: DiT) -> ModelInfo:
        return ModelInfo(depth=len(model.blocks), num_tokens=model.num_tokens, grid=(model.grid, model.grid),
                         branches=self.branches, family=self.family,
                         capabilities=frozenset({"attention_map", "value_norms", "modulated_input"}),
                         names=tuple(getattr(model, "stepcache_names", ())))

    def regions(self, model: DiT) -> list[tuple[object, str]]:
        # looked up on the block at every call, so compiled before or after apply alike
        # (forward_with_map/values: the attention a scoring policy such as ToCa asks for on full steps)
        return [(obj, name) for block in model.blocks
                for obj, name in ((block, "modulation"), (block, "attn_branch"), (block, "mlp_branch"),
                                  (block.attn, "forward_with_map"), (block.attn, "forward_with_values"))]

    def install(self, model: DiT, handle, patches: list) -> None:
        macs = dit_macs(model)
        lane = Lane()
        patches.append(ForwardPatch(model, lambda original: self._model_forward(original, handle, macs["fixed"],
                                                                                lane)))
        for layer, block in enumerate(model.blocks):
            patches.append(ForwardPatch(block, lambda _orig, l=layer, b=block: self._block_forward(b, l, handle, macs,
                                                                                                  lane)))

    @staticmethod
    def _model_forward(original, handle, fixed_macs, lane):
        def forward(x, t, y, *args, **kwargs):
            handle.before_call(x.shape[0], x.shape[0] * fixed_macs)
            lane.reset()
            try:
                return original(x, t, y, *args, **kwargs)
            finally:
                lane.reset()  # keep no reference to the stream after the call

        return forward

    @staticmethod
    def _block_forward(block: DiTBlock, layer: int, handle, macs, lane):
        sites = (("attn", macs["attn"]), ("mlp", macs["mlp"]))
        D = block.adaLN_modulation[-1].in_features

        def modulated_input(x, c):  # block 0's modulated LN input (TeaCache's indicator); its adaLN is work
            shift1, scale1 = block.modulation(c)[:2]
            return modulate(block.norm1(x), shift1, scale1), x.shape[0] * macs["block"]

        def forward(x, c):
            probes = {"modulated_input": lambda: modulated_input(x, c)} if layer == 0 else None
            private = lane.owns(x) and not hooked(block)
            out = handle.block(layer, x, lambda: inner(x, c, private), sites=sites, fixed=macs["block"],
                               probes=probes)
            lane.hand_over(out, (out is not x or private) and not hooked(block))
            return out

        def inner(x, c, private):
            skip_attn = handle.lean and skips(handle.peek(layer, "attn"))
            if skip_attn:
                return lean(x, c, private and not handle.holds(x))
            shift1, scale1, gate1, shift2, scale2, gate2 = block.modulation(c)
            a = handle.branch(
                layer, "attn",
                full=lambda: block.attn_branch(x, shift1, scale1),
                with_map=lambda: block.attn.forward_with_map(modulate(block.norm1(x), shift1, scale1)),
                with_values=lambda: block.attn.forward_with_values(modulate(block.norm1(x), shift1, scale1)),
                macs=macs["attn"], x=x,
            )
            x = x + gate1.unsqueeze(1) * a
            m = handle.branch(
                layer, "mlp",
                full=lambda: block.mlp_branch(x, shift2, scale2),
                tokens=lambda index: partial_mlp(block, gather_tokens(x, index), shift2, scale2),
                macs=macs["mlp"], x=x,
            )
            return x + gate2.unsqueeze(1) * m

        def lean(x, c, private):
            """The block with its attention reused or forecast: only the adaLN rows in use (the gates, plus
            the MLP's shift and scale if the MLP runs), residual adds without temporaries, in place on
            tensors nobody else holds. Same bits as ``inner``'s plain path."""
            rows = x.shape[0]
            skip_mlp = skips(handle.peek(layer, "mlp"))
            if skip_mlp:
                gate1, gate2 = adaln_chunks(block.adaLN_modulation[-1], c, (2, 5), 6)
                shift2 = scale2 = None
            else:
                gate1, shift2, scale2, gate2 = adaln_chunks(block.adaLN_modulation[-1], c, (2, 3, 4, 5), 6)
            handle.skip_fixed(rows, (4 if skip_mlp else 2) * D * D)
            a = handle.branch(layer, "attn", full=_unused, macs=macs["attn"], x=x)
            x = gated_add(handle, x, gate1, a, in_place=private)  # x private: nobody saw it; else a new tensor
            m = handle.branch(
                layer, "mlp",
                full=lambda: block.mlp_branch(x, shift2, scale2),
                tokens=lambda index: partial_mlp(block, gather_tokens(x, index), shift2, scale2),
                macs=macs["mlp"], x=x,
            )
            return gated_add(handle, x, gate2, m, in_place=skip_mlp)  # a computed MLP has shown x to the policy

        return forward


def partial_mlp(block: DiTBlock, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The MLP branch on a token subset (B, k, D), always eager: k changes from step to step, so a compiled
    graph of it (``compile_blocks``) must be dynamic in the token count, and on the CPU that graph was slower
    than eager (ToCa, DiT-S/2, 1 thread, 8 rounds: 0.994x with it, 1.009x with the subsets eager)."""
    return type(block).mlp_branch(block, x, shift, scale)


def _unused():  # pragma: no cover - a branch decided ahead as reused never calls its compute
    raise AssertionError("a reused branch was computed")
