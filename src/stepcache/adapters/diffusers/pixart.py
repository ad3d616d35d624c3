"""diffusers ``PixArtTransformer2DModel`` (PixArt-alpha, Chen et al., arXiv 2310.00426; PixArt-Sigma,
arXiv 2403.04692) in ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``.

Blocks are ``BasicTransformerBlock`` with ``norm_type="ada_norm_single"``: gated self-attention
(``attn1``, branch "attn"), UN-gated cross-attention to the T5 tokens (``attn2``, branch "cross"),
gated MLP (``ff``, branch "mlp"). ToCa (arXiv 2410.05317, PixArt variant) reuses "attn" on partial
steps and recomputes "cross" and "mlp" on the chosen image tokens; ``Compute(need_map=True)`` on
"cross" hands the policy the head-mean cross-attention map (B, T, L) (softmax over text tokens, the
padding mask applied) for the entropy score. The pipelines batch CFG as [uncond; cond].
"""

from __future__ import annotations

from stepcache.adapters.base import register_adapter
from stepcache.adapters.diffusers.common import BlockGroup, DiffusersAdapter, Site


@register_adapter
class PixArtAdapter(DiffusersAdapter):
    family = "diffusers.PixArtTransformer2DModel"
    class_names = ("PixArtTransformer2DModel",)
    variant = "pixart"  # ToCa's reference has a PixArt variant
    groups = (BlockGroup("BasicTransformerBlock", (Site("attn", "attn1", "self", norm="norm1"),
                                                Site("cross", "attn2", "cross"),
                                                Site("mlp", "ff", "token", norm="norm2"))),)
    cfg_layout = "uncond_first"
    image_modules = ("pos_embed", "proj_out")
    text_modules = ("caption_projection",)
