"""diffusers ``SD3Transformer2DModel`` (Stable Diffusion 3 MMDiT, Esser et al., arXiv 2403.03206) in
``StableDiffusion3Pipeline``.

``JointTransformerBlock``: one joint attention over [image; text] tokens (branch "attn", both
outputs cached together), an optional second image self-attention (SD3.5, branch "attn2"), the
image MLP (``ff``, branch "mlp") and the text MLP (``ff_context``, branch "context_mlp"; absent in
the last block).

Treatment under ToCa: the joint attention mixes every token with every other, so it is computed
in full or reused whole (like DiT's self-attention on partial steps); only the image MLP is partial
(top-k image tokens); the text stream is computed on full steps and reused otherwise (a policy
must answer Compute/Reuse for "context_mlp"). The pipeline batches CFG as [uncond; cond] and passes
the scheduler's timestep (sigma * 1000) unchanged.

Skip-layer guidance (``skip_guidance_layers``, SD3.5): inside its step window the pipeline calls
the transformer a second time, on the conditional rows only and with ``skip_layers``. That call runs
uncached (every branch computed, no cache read or written, counted as full work): its inputs differ
from the batched call's and it runs on a window of steps only, so no cache of it would be fresh.
"""

from __future__ import annotations

from stepcache.adapters.base import register_adapter
from stepcache.adapters.diffusers.common import BlockGroup, DiffusersAdapter, Site


@register_adapter
class SD3Adapter(DiffusersAdapter):
    family = "diffusers.SD3Transformer2DModel"
    class_names = ("SD3Transformer2DModel",)
    capabilities = frozenset({"value_norms"})  # joint attention: no attention map
    groups = (BlockGroup("JointTransformerBlock", (Site("attn", "attn", "joint"), Site("attn2", "attn2", "self"),
                                                Site("mlp", "ff", "token", norm="norm2"),
                                                Site("context_mlp", "ff_context", "text", norm="norm2_context")),
                         stream="pair"),)
    cfg_layout = "uncond_first"
    image_modules = ("pos_embed", "proj_out")
    text_modules = ("context_embedder",)

    def uncached_call(self, call) -> bool:
        return call.arguments.get("skip_layers") is not None
