"""Adapter for stepcache's native U-ViT: 2 * (depth // 2) + 1 plain pre-norm blocks in three groups.

Sites, in execution order (the layer numbers policies and L2C routers see): ``in_blocks`` 0..d-1,
``mid_block`` d, ``out_blocks`` d+1..2d (d = depth // 2; 0..13, 14, 15..28 for U-ViT-H/2). Each block has
an ``attn`` and an ``mlp`` branch, un-gated (added as they are). The long skips are not sites: the model's
own loop keeps the stack, and every out-block fuses its popped skip through ``skip_linear`` before its
branches, at every call, from the current pass — so a reused branch is added to a freshly fused input,
as in the reference. Tokens are all L = extras + grid^2 tokens (label and time tokens included).
"""

from __future__ import annotations

from stepcache.adapters.base import Adapter, gather_tokens, register_adapter
from stepcache.models.uvit import Block, UViT
from stepcache.core.context import ModelInfo
from stepcache.core.hooks import ForwardPatch


def uvit_macs(model: UViT) -> dict:
    """Multiply-accumulates per batch row: branches as functions of tokens computed, plus fixed work."""
    D, L, T = model.embed_dim, model.num_tokens, model.grid * model.grid
    H = model.mid_block.mlp.fc1.out_features
    pp_c = model.patch_size**2 * model.in_chans
    fixed = T * pp_c * D + L * D * pp_c  # patch embedding, decoder_pred
    fixed += len(model.out_blocks) * L * 2 * D * D if model.config.skip else 0  # skip_linear
    fixed += 8 * D * D if model.config.mlp_time_embed else 0
    fixed += model.in_chans**2 * 9 * T * model.patch_size**2 if model.config.conv else 0
    return {
        "attn": lambda k: (4 * L * D * D + 2 * L * L * D) * k // L,
        "mlp": lambda k: 2 * k * D * H,
        "fixed": fixed,
    }


@register_adapter
class UViTAdapter(Adapter):
    family = "stepcache.UViT"
    branches = ("attn", "mlp")

    def matches(self, model) -> bool:
        return isinstance(model, UViT)

    def info(self, model: UViT) -> ModelInfo:
        return ModelInfo(depth=len(model.blocks), num_tokens=model.num_tokens, grid=(model.grid, model.grid),
                         branches=self.branches, family=self.family,
                         capabilities=frozenset({"attention_map", "value_norms"}))

    def install(self, model: UViT, handle, patches: list) -> None:
        macs = uvit_macs(model)
        patches.append(ForwardPatch(model, lambda original: self._model_forward(original, handle, macs["fixed"])))
        for layer, block in enumerate(model.blocks):
            patches.append(ForwardPatch(block, lambda _orig, l=layer, b=block: self._block_forward(b, l, handle, macs)))

    @staticmethod
    def _model_forward(original, handle, fixed_macs):
        def forward(x, t, y=None, *args, **kwargs):
            handle.before_call(x.shape[0], x.shape[0] * fixed_macs)
            return original(x, t, y, *args, **kwargs)

        return forward

    @staticmethod
    def _block_forward(block: Block, layer: int, handle, macs):
        sites = (("attn", macs["attn"]), ("mlp", macs["mlp"]))

        def forward(x, skip=None):
            x = block.fuse(x, skip)  # (B, L, D); skip_linear always runs, also in a span that is skipped
            return handle.block(layer, x, lambda: inner(x), sites=sites)

        def inner(x):
            a = handle.branch(
                layer, "attn",
                full=lambda: block.attn_branch(x),
                with_map=lambda: block.attn.forward_with_map(block.norm1(x)),
                with_values=lambda: block.attn.forward_with_values(block.norm1(x)),
                macs=macs["attn"], x=x,
            )
            x = x + a
            m = handle.branch(
                layer, "mlp",
                full=lambda: block.mlp_branch(x),
                tokens=lambda index: block.mlp_branch(gather_tokens(x, index)),
                macs=macs["mlp"], x=x,
            )
            return x + m

        return forward
