"""Adapter for stepcache's native DiT (adaLN-Zero blocks: gated attention, gated MLP)."""

from __future__ import annotations

from stepcache.adapters.base import Adapter, gather_tokens, register_adapter
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
                         capabilities=frozenset({"attention_map", "value_norms", "modulated_input"}))

    def regions(self, model: DiT) -> list[tuple[object, str]]:
        # looked up on the block at every call, so compiled before or after apply alike
        # (forward_with_map/values: the attention a scoring policy such as ToCa asks for on full steps)
        return [(obj, name) for block in model.blocks
                for obj, name in ((block, "modulation"), (block, "attn_branch"), (block, "mlp_branch"),
                                  (block.attn, "forward_with_map"), (block.attn, "forward_with_values"))]

    def install(self, model: DiT, handle, patches: list) -> None:
        macs = dit_macs(model)
        patches.append(ForwardPatch(model, lambda original: self._model_forward(original, handle, macs["fixed"])))
        for layer, block in enumerate(model.blocks):
            patches.append(ForwardPatch(block, lambda _orig, l=layer, b=block: self._block_forward(b, l, handle, macs)))

    @staticmethod
    def _model_forward(original, handle, fixed_macs):
        def forward(x, t, y, *args, **kwargs):
            handle.before_call(x.shape[0], x.shape[0] * fixed_macs)
            return original(x, t, y, *args, **kwargs)

        return forward

    @staticmethod
    def _block_forward(block: DiTBlock, layer: int, handle, macs):
        sites = (("attn", macs["attn"]), ("mlp", macs["mlp"]))

        def modulated_input(x, c):  # block 0's modulated LN input (TeaCache's indicator); its adaLN is work
            shift1, scale1 = block.modulation(c)[:2]
            return modulate(block.norm1(x), shift1, scale1), x.shape[0] * macs["block"]

        def forward(x, c):
            probes = {"modulated_input": lambda: modulated_input(x, c)} if layer == 0 else None
            return handle.block(layer, x, lambda: inner(x, c), sites=sites, fixed=macs["block"], probes=probes)

        def inner(x, c):
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
                tokens=lambda index: block.mlp_branch(gather_tokens(x, index), shift2, scale2),
                macs=macs["mlp"], x=x,
            )
            return x + gate2.unsqueeze(1) * m

        return forward
