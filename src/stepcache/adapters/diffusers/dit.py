"""diffusers ``DiTTransformer2DModel`` (``DiTPipeline``): class-conditional DiT (Peebles & Xie, arXiv 2212.09748).

Blocks are ``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"``: gated self-attention
(``attn1``) and gated MLP (``ff``), the same sites as stepcache's native DiT. ``DiTPipeline``
batches CFG as [cond; uncond] (class labels then the null label) and passes the scheduler's
timestep unchanged.
"""

from __future__ import annotations

from stepcache.adapters.base import register_adapter
from stepcache.adapters.diffusers.common import BlockGroup, DiffusersAdapter, Site


@register_adapter
class DiffusersDiTAdapter(DiffusersAdapter):
    family = "diffusers.DiTTransformer2DModel"
    class_names = ("DiTTransformer2DModel",)
    groups = (BlockGroup("BasicTransformerBlock", (Site("attn", "attn1", "self"),
                                                Site("mlp", "ff", "token", norm="norm3"))),)
    cfg_layout = "cond_first"
    image_modules = ("pos_embed", "proj_out_1", "proj_out_2")
