"""U-ViT: a ViT backbone for diffusion with long skip connections (Bao et al., "All are Worth Words",
arXiv 2209.12152).

Written from the paper. Everything is a token: the time (a raw sinusoid, or one passed through an MLP)
and the class label come first, then the image patches; a learned position table covers all of them.
Blocks are plain pre-norm transformer blocks (no adaLN, no gates). The first half of the blocks push
their outputs on a stack; after one middle block, each block of the second half first fuses the
popped skip with its input through ``skip_linear`` (Linear 2D -> D on the concatenation), so
``out_blocks[k]`` pairs with ``in_blocks[depth // 2 - 1 - k]``.

Constructor arguments and parameter names follow the official code so that an official
``nnet_ema.pth`` (e.g. ImageNet 256 U-ViT-H/2) loads with ``load_state_dict(strict=True)``.
``num_classes`` counts the embedding rows INCLUDING the null label of classifier-free guidance
(1001 on ImageNet: label 1000 is "no class"); ``num_classes <= 0`` builds an unconditional model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stepcache.errors import ConfigError
from stepcache.models.dit import TimestepEmbedder

# Official configurations (U-ViT repo configs/<name>.py); in_chans 3 means a pixel-space model.
PRESETS = {
    "cifar10_uvit_small": dict(img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12, num_heads=8,
                               num_classes=-1),
    "celeba64_uvit_small": dict(img_size=64, patch_size=4, in_chans=3, embed_dim=512, depth=12, num_heads=8,
                                num_classes=-1),
    "imagenet64_uvit_mid": dict(img_size=64, patch_size=4, in_chans=3, embed_dim=768, depth=16, num_heads=12,
                                num_classes=1000),
    "imagenet64_uvit_large": dict(img_size=64, patch_size=4, in_chans=3, embed_dim=1024, depth=20, num_heads=16,
                                  num_classes=1000),
    "imagenet256_uvit_large": dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1024, depth=20, num_heads=16,
                                   num_classes=1001),
    "imagenet256_uvit_huge": dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1152, depth=28, num_heads=16,
                                  num_classes=1001, conv=False),
    "imagenet512_uvit_large": dict(img_size=64, patch_size=4, in_chans=4, embed_dim=1024, depth=20, num_heads=16,
                                   num_classes=1001),
    "imagenet512_uvit_huge": dict(img_size=64, patch_size=4, in_chans=4, embed_dim=1152, depth=28, num_heads=16,
                                  num_classes=1001, conv=False),
}
# The paper's short names (size/patch); the ambiguous "L/4" (ImageNet 64 pixels or 512 latents) has none.
ALIASES = {"U-ViT-S/2": "cifar10_uvit_small", "U-ViT-S/4": "celeba64_uvit_small", "U-ViT-M/4": "imagenet64_uvit_mid",
           "U-ViT-L/2": "imagenet256_uvit_large", "U-ViT-H/2": "imagenet256_uvit_huge",
           "U-ViT-H/4": "imagenet512_uvit_huge"}


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> tokens (B, T, D), row-major, by a stride-p convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)


class Attention(nn.Module):
    """Self-attention over all tokens; one qkv projection laid out as [q | k | v], heads inside each."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_scale: float | None = None):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed_dim {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.sdpa_scale = qk_scale  # None: SDPA's own 1/sqrt(hd), as the official code (which ignores qk_scale)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor):
        B, T, _ = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # each (B, H, T, hd)

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        B, H, T, hd = out.shape
        return self.proj(out.transpose(1, 2).reshape(B, T, H * hd))  # (B, T, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, scale=self.sdpa_scale))

    def forward_with_map(self, x: torch.Tensor):
        """Explicit-softmax attention; (output (B, T, D), head-mean map (B, T, T)) for token scores."""
        q, k, v = self.qkv_heads(x)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, T, T)
        return self.merge(attn @ v), attn.mean(dim=1)

    def forward_with_values(self, x: torch.Tensor):
        """Fused attention plus per-head value norms (B, H, T)."""
        q, k, v = self.qkv_heads(x)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.sdpa_scale)
        return self.merge(out), torch.norm(v, dim=-1, p=2)


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block ``x += attn(LN(x)); x += mlp(LN(x))``; with ``skip`` it first fuses a long skip."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, qk_scale: float | None,
                 skip: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def fuse(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        """(B, T, D) and the popped skip (B, T, D) -> (B, T, D); identity for blocks without a skip."""
        if self.skip_linear is None:
            return x
        return self.skip_linear(torch.cat([x, skip], dim=-1))

    def attn_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm1(x))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.fuse(x, skip)
        x = x + self.attn_branch(x)
        return x + self.mlp_branch(x)


@dataclass(frozen=True)
class UViTConfig:
    img_size: int = 32
    patch_size: int = 2
    in_chans: int = 4
    embed_dim: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    qk_scale: float | None = None
    mlp_time_embed: bool = False
    num_classes: int = 1001
    conv: bool = False
    skip: bool = True

    def validate(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"U-ViT {name} must be a positive integer, got {getattr(self, name)}.")
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}.")
        if self.depth % 2:
            raise ConfigError(f"U-ViT depth counts in + out blocks and must be even, got {self.depth}.")
        if self.embed_dim % 2:
            raise ConfigError(f"embed_dim must be even for the sinusoidal time token, got {self.embed_dim}.")


class UViT(nn.Module):
    """U-ViT noise-prediction network: ``model(x (B, C, H, W), t (B,) float, y (B,) labels) -> eps (B, C, H, W)``."""

    noise_schedule = "scaled_linear"  # trained on Stable Diffusion's betas (latent models; see sampling)

    def __init__(self, img_size: int = 32, patch_size: int = 2, in_chans: int = 4, embed_dim: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, mlp_time_embed: bool = False, num_classes: int = 1001,
                 use_checkpoint: bool = False, conv: bool = True, skip: bool = True):
        super().__init__()
        self.config = UViTConfig(img_size, patch_size, in_chans, embed_dim, depth, num_heads, float(mlp_ratio),
                                 bool(qkv_bias), qk_scale, bool(mlp_time_embed), int(num_classes), bool(conv),
                                 bool(skip))
        self.config.validate()
        self.use_checkpoint = use_checkpoint  # accepted for the official configs; only saves training memory
        self.embed_dim, self.in_chans, self.patch_size = embed_dim, in_chans, patch_size
        self.num_classes = int(num_classes)
        self.grid = img_size // patch_size
        self.extras = 2 if self.num_classes > 0 else 1  # [label,] time tokens before the patches
        self.num_tokens = self.extras + self.grid * self.grid

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.time_embed = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(),
                                        nn.Linear(4 * embed_dim, embed_dim)) if mlp_time_embed else nn.Identity()
        if self.num_classes > 0:
            self.label_emb = nn.Embedding(self.num_classes, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))

        def block(skip_: bool = False) -> Block:
            return Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, skip=skip_)

        self.in_blocks = nn.ModuleList([block() for _ in range(depth // 2)])
        self.mid_block = block()
        self.out_blocks = nn.ModuleList([block(skip) for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size * patch_size * in_chans)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()
        self.initialize_weights()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UViT":
        """``UViT.from_preset("U-ViT-H/2")`` (ImageNet 256 latents) or an official config name such as
        ``"cifar10_uvit_small"``; overrides go to the constructor."""
        key = ALIASES.get(name, name)
        if key not in PRESETS:
            raise ConfigError(f"Unknown U-ViT {name!r}; choose one of {', '.join([*ALIASES, *PRESETS])}.")
        return cls(**{**PRESETS[key], **overrides})

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "UViT":
        """Load an official ``nnet_ema.pth``-style state dict (architecture read from its shapes)."""
        from stepcache.models.uvit_checkpoints import load_uvit

        return load_uvit(path, **kwargs)

    @property
    def blocks(self) -> list[Block]:
        """All blocks in execution order: in_blocks, mid_block, out_blocks (the units' layer order)."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    @property
    def in_channels(self) -> int:
        """DiT's name for ``in_chans`` (data loaders and the CLI read it)."""
        return self.in_chans

    @property
    def input_size(self) -> int:
        """DiT's name for ``img_size``: the (latent) side of a sample."""
        return self.config.img_size

    @property
    def null_label(self) -> int:
        """The "no class" label used by classifier-free guidance: the last embedding row."""
        return self.num_classes - 1

    def initialize_weights(self) -> None:
        """Truncated-normal (std 0.02) linears and position table, zero biases, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    # ------------------------------------------------------------------ forward
    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Tokens (B, extras + T, D): [label, time, patches] plus the position table."""
        patches = self.patch_embed(x)  # (B, T, D)
        freq = TimestepEmbedder.sinusoid(t, self.embed_dim).to(patches.dtype)  # float32 table, model's dtype
        time = self.time_embed(freq)  # (B, D), t may be fractional
        tokens = [time.unsqueeze(1), patches]
        if self.num_classes > 0:
            if y is None:
                raise ConfigError("This U-ViT is class-conditional: pass labels y.")
            tokens.insert(0, self.label_emb(y).unsqueeze(1))  # (B, 1, D)
        return torch.cat(tokens, dim=1) + self.pos_embed  # (B, extras + T, D)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C), channel fastest inside a patch -> (B, C, H, W)."""
        p, g, C = self.patch_size, self.grid, self.in_chans
        x = x.reshape(x.shape[0], g, g, p, p, C)  # (B, h, w, p1, p2, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p1, w, p2)
        return x.reshape(x.shape[0], C, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) float time in [0, 1000], y (B,) labels -> predicted noise (B, C, H, W)."""
        h = self.embed(x, t, y)  # (B, L, D)
        skips = []
        for block in self.in_blocks:
            h = block(h)
            skips.append(h)
        h = self.mid_block(h)
        for block in self.out_blocks:
            h = block(h, skips.pop())
        h = self.decoder_pred(self.norm(h))  # (B, L, p*p*C)
        return self.final_layer(self.unpatchify(h[:, self.extras:]))


def config_dict(model: UViT) -> dict:
    return asdict(model.config)
