"""Diffusion Transformer with adaLN-Zero blocks (Peebles & Xie, arXiv 2212.09748).

Written from the paper; module and parameter names follow the official checkpoints so that
``DiT-XL-2-256x256.pt`` loads unchanged. The block is split into small pieces (``modulation``,
``attn_branch``, ``mlp_branch``) which the caching adapter calls in the same order as ``forward``,
so a run that caches nothing is bit-identical to the plain model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stepcache.errors import ConfigError

# name -> (depth, hidden_size, num_heads); patch size comes from the "/p" suffix.
PRESETS = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


_LOADERS: dict = {}  # "dit" -> load function, registered by stepcache.models.checkpoints


def register_loader(name: str, fn) -> None:
    _LOADERS[name] = fn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (B, T, D), shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position table (T, D), T = grid * grid, float64."""
    if dim % 4:
        raise ConfigError(f"hidden_size must be divisible by 4 for the 2-D sin-cos table, got {dim}.")
    # cols[r, c] = c and rows[r, c] = r; the first half of D encodes the column coordinate.
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (T, D/4)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1)


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> tokens (B, T, D) with a stride-p convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, D) laid out row-major: the conv writes (B, D, H, W), and a transposed view would make every
        # residual add of the blocks a strided pass (values are the same either way)
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the ORIGINAL timestep (0..999) then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # the table is built in float32 (as the reference does) and cast to the weights' dtype at the boundary,
        # so a bf16/fp16 model works and a float32 one is unchanged bit for bit
        return self.mlp(self.sinusoid(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label table with one extra "null" row (index num_classes) for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, y: torch.Tensor, train: bool = False) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"hidden_size {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # each (B, H, T, hd)

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        B, H, T, hd = out.shape
        return self.proj(out.transpose(1, 2).reshape(B, T, H * hd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v))

    def forward_with_map(self, x: torch.Tensor):
        """Explicit-softmax attention; returns (output (B, T, D), head-mean map (B, T, T))."""
        q, k, v = self.qkv_heads(x)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, T, T)
        return self.merge(attn @ v), attn.mean(dim=1)

    def forward_with_values(self, x: torch.Tensor):
        """Fused (SDPA) attention; returns (output (B, T, D), per-head value norms (B, H, T))."""
        q, k, v = self.qkv_heads(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v)), torch.norm(v, dim=-1, p=2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: gated attention and gated MLP, both modulated by the conditioning c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def modulation(self, c: torch.Tensor):
        """shift1, scale1, gate1, shift2, scale2, gate2, each (B, D)."""
        return self.adaLN_modulation(c).chunk(6, dim=1)

    def attn_branch(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.attn(modulate(self.norm1(x), shift, scale))

    def mlp_branch(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.mlp(modulate(self.norm2(x), shift, scale))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)
        x = x + gate1.unsqueeze(1) * self.attn_branch(x, shift1, scale1)
        x = x + gate2.unsqueeze(1) * self.mlp_branch(x, shift2, scale2)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@dataclass(frozen=True)
class DiTConfig:
    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True

    def validate(self) -> None:
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"DiT {name} must be a positive integer, got {getattr(self, name)}.")
        if self.input_size % self.patch_size:
            raise ConfigError(
                f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}."
            )
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"class_dropout_prob must lie in [0, 1), got {self.class_dropout_prob}.")


class DiT(nn.Module):
    """Class-conditional latent diffusion transformer (adaLN-Zero)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        self.config = DiTConfig(input_size, patch_size, in_channels, hidden_size, depth, num_heads,
                                mlp_ratio, class_dropout_prob, num_classes, learn_sigma)
        self.config.validate()
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.input_size = input_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.grid = input_size // patch_size
        self.num_tokens = self.grid * self.grid

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.register_buffer("pos_embed", torch.zeros(1, self.num_tokens, hidden_size), persistent=True)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, input_size: int = 32, **overrides) -> "DiT":
        """``DiT.from_preset("DiT-XL/2", input_size=32)``; overrides go to the constructor."""
        size, patch = parse_preset(name)
        depth, hidden, heads = PRESETS[size]
        kwargs = dict(input_size=input_size, patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads)
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "DiT":
        """Load a local checkpoint file or an official one by name (downloaded when online), with the loader
        that :mod:`stepcache.models.checkpoints` registers (architecture here, loading there)."""
        return _LOADERS["dit"](name_or_path, **kwargs)

    def initialize_weights(self) -> None:
        """The paper's initialisation: Xavier linears, fixed sin-cos table, zeroed adaLN and output."""

        def basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic)
        pos = sincos_pos_embed(self.pos_embed.shape[-1], self.grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # ------------------------------------------------------------------ forward
    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        """Tokens (B, T, D) and conditioning c (B, D)."""
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        return tokens, c

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W)."""
        p, g, C = self.patch_size, self.grid, self.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], C, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) latents, t (B,) original timesteps, y (B,) labels -> (B, out_channels, H, W)."""
        h, c = self.embed(x, t, y)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))


def parse_preset(name: str):
    """"DiT-XL/2" -> ("XL", 2); raises ConfigError listing the valid names."""
    valid = [f"DiT-{s}/{p}" for s in PRESETS for p in (2, 4, 8)]
    try:
        size, patch = name.removeprefix("DiT-").split("/")
        patch = int(patch)
    except ValueError:
        size, patch = None, None
    if size not in PRESETS or patch not in (2, 4, 8):
        raise ConfigError(f"Unknown model {name!r}; choose one of {', '.join(valid)}.")
    return size, patch


def config_dict(model: DiT) -> dict:
    return asdict(model.config)
