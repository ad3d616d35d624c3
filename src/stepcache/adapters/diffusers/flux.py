"""diffusers ``FluxTransformer2DModel`` (FLUX.1, Black Forest Labs) in ``FluxPipeline``.

Double-stream ``FluxTransformerBlock`` (layers 0..D-1): joint attention (branch "attn", image and
text outputs cached together), image MLP ``ff`` ("mlp"), text MLP ``ff_context`` ("context_mlp").
Single-stream ``FluxSingleTransformerBlock`` (layers D..D+S-1) over [text; image]: attention
("attn", whole sequence) and the MLP input projection ``proj_mlp`` ("mlp"); ``proj_out`` (which
mixes both) runs at every step. The single block's forward is replaced by :func:`attention_first`
(same operations, attention called first) so that every block decides "attn" before "mlp".

Treatment under ToCa: attention is computed in full or reused whole; "mlp" is partial on the top-k
image tokens (in single blocks the text rows of ``proj_mlp`` are recomputed on full computations and
reused on partial ones); "context_mlp" is Compute/Reuse. FLUX.1-dev/schnell are guidance-distilled:
no CFG batch; with ``true_cfg_scale > 1`` the pipeline calls the transformer twice per step (cond,
then uncond), and the bridge keeps a separate cache per call. The pipeline passes ``t / 1000``.
"""

from __future__ import annotations

import torch

from stepcache.adapters.base import register_adapter
from stepcache.adapters.diffusers.common import BlockGroup, DiffusersAdapter, Site
from stepcache.core.hooks import ForwardPatch


def attention_first(block):
    """``FluxSingleTransformerBlock.forward`` with the attention called before ``proj_mlp``.

    diffusers runs ``proj_mlp`` first; policies decide a block's step type at its "attn" branch,
    so the two independent branches are swapped. Same operations on the same inputs: bit-identical.
    """

    def forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, L + T, D)
        residual = hidden_states
        norm_hidden_states, gate = block.norm(hidden_states, emb=temb)
        attn_output = block.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                                 **(joint_attention_kwargs or {}))
        mlp_hidden_states = block.act_mlp(block.proj_mlp(norm_hidden_states))
        hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
        hidden_states = residual + gate.unsqueeze(1) * block.proj_out(hidden_states)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]

    return forward


@register_adapter
class FluxAdapter(DiffusersAdapter):
    family = "diffusers.FluxTransformer2DModel"
    class_names = ("FluxTransformer2DModel",)
    groups = (
        BlockGroup("FluxTransformerBlock", (Site("attn", "attn", "joint"), Site("mlp", "ff", "token"),
                                          Site("context_mlp", "ff_context", "text")), stream="pair"),
        BlockGroup("FluxSingleTransformerBlock", (Site("attn", "attn", "joint"), Site("mlp", "proj_mlp", "split")),
                   stream="pair"),
    )
    timestep_scale = 1000.0
    cfg_layout = "separate_calls"
    image_modules = ("x_embedder", "proj_out")
    text_modules = ("context_embedder",)

    capabilities = frozenset({"value_norms"})  # joint attention with RoPE: no attention map

    def patch_blocks(self, model, handle, patches: list) -> None:
        for block in model.single_transformer_blocks:
            patches.append(ForwardPatch(block, lambda _original, b=block: attention_first(b)))

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
