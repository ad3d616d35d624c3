"""STDiT3: OpenSora v1.2's spatial-temporal diffusion transformer (hpcai-tech, "Open-Sora: Democratizing
Efficient Video Production for All", arXiv 2412.20404; the v1.2 report).

Written from the report and the spec (``shared/specs/toca-opensora.md``); the constructor takes the reference
config's argument names and the module names follow the official checkpoint ``hpcai-tech/OpenSora-STDiT-v3``,
so its state dict loads as is (with or without ``rope.freqs``). Tokens are laid out frame-major,
``index = t * S + h * Wp + w``; spatial blocks attend within a frame (T groups of S tokens), temporal blocks
along time at one position (S groups of T tokens, with RoPE). Every block also cross-attends to the packed
T5 text. As in ``models/dit.py`` the block is split into pieces (``modulation``, ``attn_branch``,
``cross_branch``, ``mlp_branch``) that the caching adapter calls in ``forward``'s order, so a run that caches
nothing is bit-identical to the plain model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stepcache.errors import ConfigError
from stepcache.models.dit import TimestepEmbedder

# name -> constructor arguments (the reference registry's STDiT3-XL/2 and STDiT3-3B/2).
PRESETS = {
    "STDiT3-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=(1, 2, 2)),
    "STDiT3-3B/2": dict(depth=28, hidden_size=1872, num_heads=26, patch_size=(1, 2, 2)),
}
# Reference config options that only choose kernels or training behaviour: accepted with these values.
_INERT = {"enable_layernorm_kernel": None, "enable_sequence_parallelism": False, "only_train_temporal": None,
          "freeze_y_embedder": None, "skip_y_embedder": False, "input_size": None, "class_dropout_prob": None}


def rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last axis computed in fp32, scaled by ``weight`` in the input dtype (T5/LLaMA style)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_fp32(x, self.weight, self.eps)


class Rope(nn.Module):
    """Rotary position embedding over the sequence axis (-2) with ADJACENT pairs (2j, 2j+1) rotated by
    frequency j (the rotary-embedding-torch convention); ``freqs`` = 10000^(-2j/dim), kept as a parameter so
    the checkpoint key ``rope.freqs`` loads."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., T, hd) -> rotated, in the dtype arithmetic promotion gives (fp32 freqs: fp32)."""
        T = x.shape[-2]
        pos = torch.arange(T, device=x.device, dtype=x.dtype).type(self.freqs.dtype)
        angles = (pos[:, None] * self.freqs[None]).repeat_interleave(2, dim=-1)  # (T, hd): (n r) with r = 2
        pairs = x.unflatten(-1, (-1, 2))  # (..., T, hd/2, 2)
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (-b, a) per pair
        # contiguous: matmul rounds differently on a strided (head-permuted) operand
        return (x * angles.cos() + rotated * angles.sin()).contiguous()


class Attention(nn.Module):
    """Self-attention: fused qkv, per-head RMS qk-norm, optional RoPE, softmax(q k^T / sqrt(hd)) v, proj.

    ``fused`` (the reference's ``enable_flash_attn``) uses SDPA where the sequence is longer than the batch of
    groups, as the reference switches flash on; otherwise the explicit softmax in fp32.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rope: Rope | None = None, fused: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"hidden_size {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.fused = fused
        self._rope = [rope]  # a list, so the shared Rope is not registered (and saved) once per block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (G, L, D): G independent groups (frames or positions) of L tokens."""
        G, L, D = x.shape
        q, k, v = self.qkv(x).view(G, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)  # each (G, H, L, hd)
        rope = self._rope[0]
        if rope is not None:
            q, k = rope(q), rope(k)
        if self.fused and L > G:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            dtype = q.dtype
            attn = torch.matmul(q * self.scale, k.transpose(-2, -1)).float().softmax(dim=-1).to(dtype)
            out = torch.matmul(attn, v)  # (G, H, L, hd)
        return self.proj(out.transpose(1, 2).reshape(G, L, D))


class CrossAttention(nn.Module):
    """Image tokens attend to the packed text of their own sample (block-diagonal mask), explicit softmax."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def text_kv(self, text: torch.Tensor):
        """text (1, Ltot, D) packed -> k, v each (1, H, Ltot, hd)."""
        kv = self.kv_linear(text).view(1, -1, 2, self.num_heads, self.head_dim)
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    def forward(self, x: torch.Tensor, kv, bias: torch.Tensor, with_map: bool = False):
        """x (B, n, D) queries, kv from ``text_kv``, bias (B, Ltot) additive (0 on the row's own text, -inf
        elsewhere). Returns the output (B, n, D) and, with ``with_map``, the head-mean map (B, n, Ltot)."""
        B, n, D = x.shape
        k, v = kv
        q = self.q_linear(x).view(1, B * n, self.num_heads, self.head_dim).transpose(1, 2)  # (1, H, B n, hd)
        scores = torch.matmul(q * self.head_dim**-0.5, k.transpose(-2, -1))  # (1, H, B n, Ltot)
        scores = scores + bias.repeat_interleave(n, dim=0)  # row b*n + j sees sample b's text only
        attn = scores.softmax(dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(B, n, D)
        out = self.proj(out)
        if not with_map:
            return out
        return out, attn.mean(dim=1).view(B, n, -1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), shift/scale (B, 1, D)."""
    return x * (1 + scale) + shift


class STDiT3Block(nn.Module):
    """gated self-attention (spatial or temporal) -> un-gated cross-attention -> gated MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, temporal: bool,
                 rope: Rope | None = None, fused: bool = False):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(hidden_size, num_heads, qk_norm, rope if temporal else None, fused)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def modulation(self, t_mlp: torch.Tensor):
        """shift1, scale1, gate1, shift2, scale2, gate2, each (B, 1, D), from t_mlp (B, 6D)."""
        B = t_mlp.shape[0]
        return (self.scale_shift_table[None] + t_mlp.reshape(B, 6, -1)).chunk(6, dim=1)

    def attn_branch(self, x: torch.Tensor, shift, scale, T: int, S: int) -> torch.Tensor:
        """Un-gated self-attention output (B, T*S, D): per frame (spatial) or per position (temporal)."""
        B, N, D = x.shape
        h = t2i_modulate(self.norm1(x), shift, scale).view(B, T, S, D)
        if self.temporal:
            h = h.transpose(1, 2).reshape(B * S, T, D)  # (B S, T, D)
            return self.attn(h).view(B, S, T, D).transpose(1, 2).reshape(B, N, D)
        return self.attn(h.reshape(B * T, S, D)).view(B, N, D)

    def cross_branch(self, x: torch.Tensor, text, with_map: bool = False):
        """Cross-attention of the tokens x (B, n, D) (all, or a gathered subset) to ``text`` (Text)."""
        return self.cross_attn(x, text.kv(self.cross_attn), text.bias, with_map)

    def mlp_input(self, x: torch.Tensor, shift, scale) -> torch.Tensor:
        return t2i_modulate(self.norm2(x), shift, scale)

    def mlp_branch(self, x: torch.Tensor, shift, scale) -> torch.Tensor:
        return self.mlp(self.mlp_input(x, shift, scale))

    def forward(self, x: torch.Tensor, text, t_mlp: torch.Tensor, T: int, S: int) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(t_mlp)
        x = x + gate1 * self.attn_branch(x, shift1, scale1, T, S)
        x = x + self.cross_branch(x, text)
        return x + gate2 * self.mlp_branch(x, shift2, scale2)


class Text:
    """The packed caption of one forward: tokens (1, Ltot, D), per-row lengths, and the additive mask (B, Ltot)
    (0 on the row's own text, -inf elsewhere: the block-diagonal mask of the reference's packed attention)."""

    def __init__(self, tokens: torch.Tensor, lengths: list[int], rows: int):
        self.tokens, self.lengths = tokens, lengths
        total = sum(lengths)
        bias = torch.full((rows, total), float("-inf"), dtype=tokens.dtype, device=tokens.device)
        start = 0
        for b, n in enumerate(lengths):
            bias[b, start:start + n] = 0
            start += n
        self.bias = bias

    def kv(self, cross: CrossAttention):
        return cross.text_kv(self.tokens)


class CaptionEmbedder(nn.Module):
    """T5 features (B, 1, L, C) -> (B, 1, L, D) by a 2-layer tanh-GELU MLP; ``y_embedding`` is the learned null
    caption (L, C) used as the unconditional text."""

    def __init__(self, in_channels: int, hidden_size: int, token_num: int):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # each (B, 1, D)
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))


def pos_embed_2d(dim: int, h: int, w: int, scale: float, base_size: int, device=None) -> torch.Tensor:
    """OpenSora's resolution-scaled 2-D sin/cos table (1, h*w, dim), fp32: row r -> r / scale * base / h,
    column c -> c / scale * base / w; [sin, cos] of the column first, then of the row."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim // 2, 2, device=device).float() / (dim // 2)))
    rows = torch.arange(h, device=device) / scale * (base_size / h)
    cols = torch.arange(w, device=device) / scale * (base_size / w)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")  # (h, w) each

    def sincos(pos: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("i,d->id", pos.reshape(-1), inv_freq)
        return torch.cat([out.sin(), out.cos()], dim=-1)

    return torch.cat([sincos(cc), sincos(rr)], dim=-1).unsqueeze(0)


class STDiT3(nn.Module):
    """OpenSora v1.2's text-to-video transformer; ``forward(x, timestep, y, mask, fps, height, width)``.

    x (B, C, T, H, W) latents; timestep (B,) continuous in [0, 1000]; y (B, 1, L, caption_channels)
    precomputed T5 features with mask (B or 1, L); fps, height, width (B,) tensors (pixel sizes).
    Returns (B, 2C, T, H, W) in fp32 (channels C.. are the learned-sigma leftover).
    """

    def __init__(self, depth: int = 28, hidden_size: int = 1152, num_heads: int = 16, patch_size=(1, 2, 2),
                 in_channels: int = 4, caption_channels: int = 4096, model_max_length: int = 300,
                 qk_norm: bool = True, mlp_ratio: float = 4.0, pred_sigma: bool = True, input_sq_size: int = 512,
                 drop_path: float = 0.0, enable_flash_attn: bool = False, **options):
        super().__init__()
        for name, value in options.items():
            if name not in _INERT:
                raise ConfigError(f"Unknown STDiT3 option {name!r}.")
            if _INERT[name] is not None and value != _INERT[name]:
                raise ConfigError(f"STDiT3 option {name}={value!r} is not supported (training or multi-GPU only).")
        patch_size = tuple(int(p) for p in patch_size)
        for name, value in (("depth", depth), ("hidden_size", hidden_size), ("num_heads", num_heads),
                            ("in_channels", in_channels), ("caption_channels", caption_channels),
                            ("model_max_length", model_max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"STDiT3 {name} must be a positive integer, got {value!r}.")
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ConfigError(f"STDiT3 patch_size must be three positive integers, got {patch_size!r}.")
        if hidden_size % num_heads or hidden_size % 4 or (hidden_size // num_heads) % 2:
            raise ConfigError(f"STDiT3 hidden_size {hidden_size} must split into {num_heads} heads of even size "
                              "and be divisible by 4.")
        if drop_path != 0.0:
            raise ConfigError("STDiT3 drop_path must be 0 for sampling.")
        self.config = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size,
                           in_channels=in_channels, caption_channels=caption_channels,
                           model_max_length=model_max_length, qk_norm=qk_norm, mlp_ratio=mlp_ratio,
                           pred_sigma=pred_sigma, input_sq_size=input_sq_size, enable_flash_attn=enable_flash_attn)
        self.depth, self.hidden_size, self.num_heads = depth, hidden_size, num_heads
        self.patch_size, self.in_channels = patch_size, in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.input_sq_size = input_sq_size
        self.model_max_length = model_max_length

        self.rope = Rope(hidden_size // num_heads)
        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.fps_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, model_max_length)
        self.spatial_blocks = nn.ModuleList([
            STDiT3Block(hidden_size, num_heads, mlp_ratio, qk_norm, False, None, enable_flash_attn)
            for _ in range(depth)])
        self.temporal_blocks = nn.ModuleList([
            STDiT3Block(hidden_size, num_heads, mlp_ratio, qk_norm, True, self.rope, enable_flash_attn)
            for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, math.prod(patch_size), self.out_channels)
        self.initialize_weights()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "STDiT3":
        """``STDiT3.from_preset("STDiT3-XL/2", qk_norm=True)``; overrides go to the constructor."""
        if name not in PRESETS:
            raise ConfigError(f"Unknown model {name!r}; choose one of {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    def initialize_weights(self) -> None:
        """Xavier linears with zero biases, as OpenSora; the temporal blocks' output projections start at 0
        (random-weight tests re-randomise them)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.fps_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.fps_embedder.mlp[2].weight)
        for block in self.temporal_blocks:
            for lin in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
                nn.init.zeros_(lin.weight)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``; a checkpoint without ``rope.freqs`` (older exports) keeps the
        computed frequencies."""
        if "rope.freqs" not in state_dict:
            state_dict = {**state_dict, "rope.freqs": self.rope.freqs.detach().clone()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ forward pieces
    def grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        """(T, Hp, Wp) patches of latents (B, C, T, H, W), the sizes padded up to multiples of the patch."""
        return tuple(-(-n // p) for n, p in zip(x.shape[2:], self.patch_size))

    def encode_text(self, y: torch.Tensor, mask: torch.Tensor | None) -> Text:
        """y (B, 1, L, C) -> packed text of the rows' masked tokens."""
        B = y.shape[0]
        h = self.y_embedder(y).squeeze(1)  # (B, L, D)
        if mask is None:
            return Text(h.reshape(1, -1, self.hidden_size), [h.shape[1]] * B, B)
        if mask.shape[0] != B:
            mask = mask.repeat(B // mask.shape[0], 1)
        keep = mask != 0  # (B, L)
        tokens = h.masked_select(keep.unsqueeze(-1)).view(1, -1, self.hidden_size)
        return Text(tokens, keep.sum(dim=1).tolist(), B)

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, mask, fps, height, width):
        """tokens (B, N, D), t (B, D), t_mlp (B, 6D), text, (T, S) and the padded grid."""
        dtype = self.x_embedder.proj.weight.dtype
        B = x.shape[0]
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)
        T, Hp, Wp = self.grid(x)
        S = Hp * Wp
        scale = (height[0].item() * width[0].item()) ** 0.5 / self.input_sq_size
        pos = pos_embed_2d(self.hidden_size, Hp, Wp, scale, round(S**0.5), x.device).to(dtype)  # (1, S, D)
        t = self.t_embedder.mlp(TimestepEmbedder.sinusoid(timestep, 256).to(dtype))
        fps = fps.reshape(-1)
        fps = fps.repeat(B // fps.shape[0]) if fps.shape[0] != B else fps
        t = t + self.fps_embedder.mlp(TimestepEmbedder.sinusoid(fps, 256).to(dtype))  # (B, D)
        t_mlp = self.t_block(t)  # (B, 6D)
        text = self.encode_text(y, mask)
        tokens = self.x_embedder(x).view(B, T, S, -1) + pos[:, None]  # (B, T, S, D)
        return tokens.reshape(B, T * S, -1), t, t_mlp, text, (T, Hp, Wp)

    def unpatchify(self, x: torch.Tensor, grid, size) -> torch.Tensor:
        """(B, N, pt*ph*pw*C) -> (B, C, T, H, W), padding cropped; channel fastest within a patch."""
        (T, Hp, Wp), (pt, ph, pw), C = grid, self.patch_size, self.out_channels
        B = x.shape[0]
        x = x.view(B, T, Hp, Wp, pt, ph, pw, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
        x = x.reshape(B, C, T * pt, Hp * ph, Wp * pw)
        return x[:, :, : size[0], : size[1], : size[2]]

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, mask=None, x_mask=None,
                fps=None, height=None, width=None, **kwargs) -> torch.Tensor:
        if x_mask is not None:
            raise ConfigError("STDiT3 in stepcache does not support temporal masks (image/video conditioning).")
        if fps is None or height is None or width is None:
            raise ConfigError("STDiT3 needs fps, height and width (pixel sizes) as (B,) tensors.")
        size = x.shape[2:]
        h, t, t_mlp, text, grid = self.embed(x, timestep, y, mask, fps, height, width)
        T, S = grid[0], grid[1] * grid[2]
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            h = spatial(h, text, t_mlp, T, S)
            h = temporal(h, text, t_mlp, T, S)
        return self.unpatchify(self.final_layer(h, t), grid, size).float()


class PatchEmbed3D(nn.Module):
    """Latents (B, C, T, H, W) -> tokens (B, T*Hp*Wp, D): zero-pad T, H, W at the end, stride-p Conv3d."""

    def __init__(self, patch_size, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        T, H, W = x.shape[2:]
        x = F.pad(x, (0, -W % pw, 0, -H % ph, 0, -T % pt))
        return self.proj(x).flatten(2).transpose(1, 2)
