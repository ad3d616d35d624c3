"""diffusers ``WanTransformer3DModel`` (Wan 2.1, Wan Team, arXiv 2503.20314) in ``WanPipeline``.

``WanTransformerBlock``: gated self-attention with 3-D RoPE (``attn1``, branch "attn"), un-gated
cross-attention to the umT5 tokens (``attn2``, branch "cross"), gated MLP (``ffn``, branch "mlp"); the
adaLN table is the model's timestep projection plus each block's ``scale_shift_table`` (no per-block
projection). The attention modules are ``WanAttention`` (q/k RMSNorm over all heads): their sites are the
``wan_self`` / ``qk_cross`` kinds of :mod:`.video_sites`. ``norm1`` and ``norm3`` feed only the
self-attention and the MLP, so they are skipped when those are reused.

Token geometry: latents (B, C, F, H, W), patch (p_t, p_h, p_w); tokens F/p_t x H/p_h x W/p_w frame-major,
grid (F/p_t * H/p_h, W/p_w). Capabilities: the cross-attention map (B, T, L) (ToCa's PixArt rules, the
cross-attention entropy of its text-conditioned reference: ``variant="pixart"`` by default), the
self-attention map (B, T, T) (RoPE applied; memory T^2 per row: tiny models only), value norms, and the
first block's modulated input (TeaCache). ``WanPipeline`` calls the transformer twice per step with CFG
(cond, then uncond): a separate state per call. Wan 2.2's second expert (``transformer_2``) is not cached:
apply stepcache to the pipeline's ``transformer`` only (the low-noise steps then run plain).
"""

from __future__ import annotations

import math

from stepcache.adapters.base import register_adapter
from stepcache.adapters.diffusers.common import BlockGroup, DiffusersAdapter, Site
from stepcache.adapters.diffusers.probes import register_modulated_input
from stepcache.adapters.diffusers.video_sites import video_grid


def _modulated(block, call):
    """``norm1(x) * (1 + scale) + shift`` (B, T, D) with the block's own arithmetic (float32 adaLN)."""
    h, temb = call.arguments["hidden_states"], call.arguments["temb"]
    if temb.ndim == 4:  # per-token timesteps (Wan 2.2): (B, T, 6, D)
        table = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)
        shift, scale = table[0].squeeze(2), table[1].squeeze(2)
    else:  # (B, 6, D)
        shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
    return (block.norm1(h.float()) * (1 + scale) + shift).type_as(h)


register_modulated_input("WanTransformerBlock", _modulated, lambda block, call: 0)  # no per-block projection


@register_adapter
class WanAdapter(DiffusersAdapter):
    family = "diffusers.WanTransformer3DModel"
    class_names = ("WanTransformer3DModel",)
    variant = "pixart"  # ToCa: cross-attention entropy over the text tokens (the text-conditioned reference)
    groups = (BlockGroup("WanTransformerBlock", (Site("attn", "attn1", "wan_self", norm="norm1"),
                                              Site("cross", "attn2", "qk_cross"),
                                              Site("mlp", "ffn", "token", norm="norm3"))),)
    cfg_layout = "separate_calls"
    image_modules = ("proj_out",)  # + the Conv3d patch embedding (_fixed_macs)
    text_modules = ("condition_embedder.text_embedder",)

    def default_grid(self, model):
        pt, ph, pw = model.config.patch_size  # Wan 2.1's default video: 81 frames of 480 x 832 -> (21, 60, 104)
        return video_grid(21 // pt, 60 // ph, 104 // pw)[1]

    def geometry(self, model, call):
        x = call.arguments["hidden_states"]  # (B, C, F, H, W)
        pt, ph, pw = model.config.patch_size
        T, grid = video_grid(x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        return T, grid, call.arguments["encoder_hidden_states"].shape[1]

    def _fixed_macs(self, model):
        per_image, per_text, per_row = super()._fixed_macs(model)
        conv = model.patch_embedding  # Conv3d (the base counts Linear and Conv2d): one output position per token
        return per_image + conv.in_channels * conv.out_channels * math.prod(conv.kernel_size), per_text, per_row
