"""diffusers ``LTXVideoTransformer3DModel`` (LTX-Video, HaCohen et al., arXiv 2501.00103) in ``LTXPipeline``.

``LTXVideoTransformerBlock``: gated self-attention with 3-D RoPE (``attn1``, branch "attn"), un-gated
cross-attention to the T5 tokens (``attn2``, branch "cross"; it reads the residual stream itself, no
norm), gated MLP (``ff``, branch "mlp"); adaLN from the model's timestep embedding plus each block's
``scale_shift_table``. Attention modules are ``LTXAttention`` (q/k RMSNorm over all heads): sites
``ltx_self`` / ``qk_cross`` of :mod:`.video_sites`.

Token geometry: the pipeline passes packed latents (B, T, C) and the latent ``num_frames``, ``height``,
``width``; tokens F/p_t x H/p x W/p frame-major, grid (F/p_t * H/p, W/p). Capabilities: cross-attention
map (ToCa's PixArt rules by default, as for Wan), self-attention map (RoPE applied; tiny models only),
value norms, the first block's modulated input (TeaCache). The pipeline batches CFG as [uncond; cond]
and passes the scheduler's timestep (sigma * 1000) unchanged.
"""

from __future__ import annotations

from stepcache.adapters.base import register_adapter
from stepcache.adapters.diffusers.common import BlockGroup, DiffusersAdapter, Site
from stepcache.adapters.diffusers.probes import register_modulated_input
from stepcache.adapters.diffusers.video_sites import video_grid


def _modulated(block, call):
    """``norm1(x) * (1 + scale_msa) + shift_msa`` (B, T, D), the block's own arithmetic."""
    h, temb = call.arguments["hidden_states"], call.arguments["temb"]
    table = block.scale_shift_table[None, None] + temb.reshape(h.shape[0], temb.size(1), 6, -1)  # (B, 1, 6, D)
    shift, scale = table.unbind(dim=2)[:2]
    return block.norm1(h) * (1 + scale) + shift


register_modulated_input("LTXVideoTransformerBlock", _modulated, lambda block, call: 0)  # no per-block projection


@register_adapter
class LTXVideoAdapter(DiffusersAdapter):
    family = "diffusers.LTXVideoTransformer3DModel"
    class_names = ("LTXVideoTransformer3DModel",)
    variant = "pixart"  # ToCa: cross-attention entropy over the text tokens (the text-conditioned reference)
    groups = (BlockGroup("LTXVideoTransformerBlock", (Site("attn", "attn1", "ltx_self"),
                                                   Site("cross", "attn2", "qk_cross"),
                                                   Site("mlp", "ff", "token"))),)
    cfg_layout = "uncond_first"
    image_modules = ("proj_in", "proj_out")
    text_modules = ("caption_projection",)

    def default_grid(self, model):
        return video_grid(21, 16, 22)[1]  # LTXPipeline's default video: 161 frames of 512 x 704 -> (21, 16, 22)

    def geometry(self, model, call):
        a = call.arguments
        x = a["hidden_states"]  # (B, T, C) packed
        cfg = model.config
        F, H, W = a.get("num_frames"), a.get("height"), a.get("width")
        if None in (F, H, W):
            return x.shape[1], (1, x.shape[1]), a["encoder_hidden_states"].shape[1]
        T, grid = video_grid(F // int(cfg.patch_size_t), H // int(cfg.patch_size), W // int(cfg.patch_size))
        return T, grid, a["encoder_hidden_states"].shape[1]
