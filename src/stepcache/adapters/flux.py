"""diffusers ``FluxTransformer2DModel`` (FLUX.1, Black Forest Labs) in ``FluxPipeline``.

Double-stream ``FluxTransformerBlock`` (layers 0..D-1): joint attention (branch "attn", image and
text outputs cached together), image MLP ``ff`` ("mlp"), text MLP ``ff_context`` ("context_mlp").
Single-stream ``FluxSingleTransformerBlock`` (layers D..D+S-1) over [text; image]: attention
("attn", whole sequence) and the MLP input projection ``proj_mlp`` ("mlp"); ``proj_out`` (which
mixes both) runs at every step.

Treatment under ToCa: attention is computed in full or reused whole; "mlp" is partial on the top-k
image tokens (in single blocks the text rows of ``proj_mlp`` are recomputed on full computations and
reused on partial ones); "context_mlp" is Compute/Reuse. FLUX.1-dev/schnell are guidance-distilled:
no CFG batch; with ``true_cfg_scale > 1`` the pipeline calls the transformer twice per step (cond,
then uncond), and the bridge keeps a separate cache per call. The pipeline passes ``t / 1000``.
"""

from __future__ import annotations

from stepcache.adapters.base import register_adapter
from stepcache.adapters.diffusers_common import BlockGroup, DiffusersAdapter, Site


@register_adapter
class FluxAdapter(DiffusersAdapter):
    family = "diffusers.FluxTransformer2DModel"
    class_names = ("FluxTransformer2DModel",)
    groups = (
        BlockGroup("transformer_blocks", (Site("attn", "attn", "joint"), Site("mlp", "ff", "token"),
                                          Site("context_mlp", "ff_context", "text"))),
        BlockGroup("single_transformer_blocks", (Site("attn", "attn", "joint"), Site("mlp", "proj_mlp", "split"))),
    )
    timestep_scale = 1000.0
    cfg_layout = "separate_calls"
    image_modules = ("x_embedder", "proj_out")
    text_modules = ("context_embedder",)

    def default_grid(self, model):
        return 64, 64  # 1024 px; the real grid is read from img_ids at call time

    def geometry(self, model, call):
        """Packed latents (B, T, C); the grid from ``img_ids`` (T, 3) = (0, row, col)."""
        x = call.arguments["hidden_states"]
        ids = call.arguments.get("img_ids")
        if ids is not None and ids.numel():
            ids = ids[0] if ids.ndim == 3 else ids
            grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        else:
            grid = (1, x.shape[1])
        ctx = call.arguments.get("encoder_hidden_states")
        return x.shape[1], grid, (0 if ctx is None else ctx.shape[1])
