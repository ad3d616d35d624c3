"""diffusers ``CogVideoXTransformer3DModel`` (CogVideoX, Yang et al., arXiv 2408.06072) in ``CogVideoXPipeline``.

``CogVideoXBlock`` is two-stream: the image tokens and the T5 text tokens each get their own adaLN
(``CogVideoXLayerNormZero``: shift, scale and gate per stream) but share one joint attention over
[text; video] (``attn1``, branch "attn": both outputs cached together) and one MLP run on the concatenated
[text; video] sequence (``ff``, branch "mlp", a ``split`` site: the video part supports ``Partial``, the
text part is recomputed on full computations and reused on partial ones). The block returns
``(hidden_states, encoder_hidden_states)`` (video first, unlike SD3/FLUX): stream ``"image_pair"``.

Token geometry: latents (B, F, C, H, W), F latent frames; tokens F' x H/p x W/p frame-major (F' = F, or
ceil(F / p_t) with CogVideoX 1.5's temporal patches); grid (F' * H/p, W/p). Capabilities: value norms
(joint attention with RoPE: no attention map, so ToCa takes ``score="kv-norm"``), and the modulated input
of the first block (``norm1``'s video output, for TeaCache). The pipeline batches CFG as [uncond; cond] and
passes the scheduler's (integer) timestep unchanged.
"""

from __future__ import annotations

from stepcache.adapters.base import register_adapter
from stepcache.adapters.diffusers.common import BlockGroup, DiffusersAdapter, Site
from stepcache.adapters.diffusers.probes import register_modulated_input
from stepcache.adapters.diffusers.video_sites import video_grid


def _modulated(block, call):
    """``norm1``'s modulated video tokens (B, T, D): the attention's image input, bit for bit."""
    a = call.arguments
    return block.norm1(a["hidden_states"], a["encoder_hidden_states"], a["temb"])[0]


def _modulated_macs(block, call) -> int:
    lin = block.norm1.linear  # (time_embed_dim -> 6 D), once per row
    return call.arguments["hidden_states"].shape[0] * lin.in_features * lin.out_features


register_modulated_input("CogVideoXBlock", _modulated, _modulated_macs)


@register_adapter
class CogVideoXAdapter(DiffusersAdapter):
    family = "diffusers.CogVideoXTransformer3DModel"
    class_names = ("CogVideoXTransformer3DModel",)
    capabilities = frozenset({"value_norms"})  # joint attention: no attention map
    groups = (BlockGroup("CogVideoXBlock", (Site("attn", "attn1", "joint"), Site("mlp", "ff", "split")),
                         stream="image_pair"),)
    cfg_layout = "uncond_first"
    image_modules = ("patch_embed.proj", "proj_out")
    text_modules = ("patch_embed.text_proj",)

    def _tokens(self, model, frames: int, height: int, width: int):
        cfg = model.config
        p, pt = int(cfg.patch_size), cfg.patch_size_t
        frames = frames if pt is None else -(-frames // int(pt))
        return video_grid(frames, height // p, width // p)

    def default_grid(self, model):
        cfg = model.config  # the checkpoint's sample size (CogVideoX-2b: 49 frames of 480 x 720)
        frames = (int(cfg.sample_frames) - 1) // int(cfg.temporal_compression_ratio) + 1
        return self._tokens(model, frames, int(cfg.sample_height), int(cfg.sample_width))[1]

    def geometry(self, model, call):
        x = call.arguments["hidden_states"]  # (B, F, C, H, W)
        T, grid = self._tokens(model, x.shape[1], x.shape[-2], x.shape[-1])
        return T, grid, call.arguments["encoder_hidden_states"].shape[1]
