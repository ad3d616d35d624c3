"""Import the ToCa repository's PixArt-alpha code (the ``PixArt`` model with ToCa's blocks, ``cache_functions``
and the DPM-Solver wrapper ``DPMS``) on a CPU.

Nothing of the reference is shipped: ``ref_dir`` points to an extracted ``PixArt-alpha-ToCa`` folder of
Shenyi-Z/ToCa. Its package ``__init__`` files import every sampler, dataset and training helper, so the
packages on the way are created empty (``__path__`` only) and only the modules needed are executed. Missing or
GPU-only imports get small stand-ins, in memory only (nothing is written into the checkout): ``xformers``
(only ``BlockDiagonalMask``, which the reference materialises into an additive 0/-inf mask: its attention
is an explicit softmax already), ``mmcv`` (a registry, the logger table, ``get_dist_info``), ``timm``'s
``PatchEmbed``, ``Mlp``, ``Attention`` and ``DropPath`` (timm needs torchvision), ``torchvision.transforms``
(imported, unused here) and ``einops`` (unused by the PixArt-alpha model at 256/512 px).

Also here: the reference <-> diffusers checkpoint key mapping (after diffusers'
``scripts/convert_pixart_alpha_to_diffusers.py``) and a recorder of the reference's block decisions and
top-k selections, both used by benchmarks/pixart_toca_parity.py.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from pathlib import Path

import torch
from torch import nn

from opensora_ref import _BlockDiagonalMask, _Mlp, _Registry, _module, isolated_imports

_PACKAGES = ("diffusion", "diffusion.model", "diffusion.model.nets", "diffusion.utils")
_OURS = ("diffusion", "xformers", "mmcv", "timm", "torchvision", "einops")


class _PatchEmbed(nn.Module):
    """timm's PatchEmbed as PixArt uses it: a stride-p convolution, tokens in row-major order, no norm."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True, **_):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):  # (B, C, H, W) -> (B, T, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    """The attributes of timm's Attention that the reference's WindowAttention subclass reads."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0, **_):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop, self.proj = nn.Dropout(attn_drop), nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)


def _unused(*args, **kwargs):
    raise RuntimeError("stand-in called: this reference path is not part of the parity run")


def _stubs() -> dict:
    fmha = _module("xformers.ops.fmha", BlockDiagonalMask=_BlockDiagonalMask)
    fmha.attn_bias = _module("xformers.ops.fmha.attn_bias", BlockDiagonalMask=_BlockDiagonalMask)
    ops = _module("xformers.ops", fmha=fmha, memory_efficient_attention=_unused)
    layers = _module("timm.models.layers", DropPath=nn.Identity)
    vit = _module("timm.models.vision_transformer", Mlp=_Mlp, PatchEmbed=_PatchEmbed, Attention=_Attention)
    logging = _module("mmcv.utils.logging", logger_initialized={})
    utils = _module("mmcv.utils", logging=logging)
    runner = _module("mmcv.runner", get_dist_info=lambda: (0, 1))
    transforms = _module("torchvision.transforms")
    return {
        "xformers": _module("xformers", ops=ops), "xformers.ops": ops, "xformers.ops.fmha": fmha,
        "xformers.ops.fmha.attn_bias": fmha.attn_bias,
        "mmcv": _module("mmcv", Registry=_Registry, utils=utils, runner=runner), "mmcv.utils": utils,
        "mmcv.utils.logging": logging, "mmcv.runner": runner,
        "timm": _module("timm"), "timm.models": _module("timm.models", layers=layers, vision_transformer=vit),
        "timm.models.layers": layers, "timm.models.vision_transformer": vit,
        "torchvision": _module("torchvision", transforms=transforms), "torchvision.transforms": transforms,
        "einops": _module("einops", rearrange=_unused, repeat=_unused),
    }


def load(ref_dir: Path) -> types.SimpleNamespace:
    """The reference's PixArt module, its DPM-Solver wrapper module and ``cache_functions`` package, imported
    in isolation (the ``diffusion`` and stand-in names leave ``sys.modules`` afterwards; the loaded modules
    stay reachable through the returned namespace)."""
    root = Path(ref_dir)
    if not (root / "diffusion" / "model" / "nets" / "PixArt.py").exists():
        raise SystemExit(f"{root} is not the PixArt-alpha-ToCa folder of Shenyi-Z/ToCa "
                         "(no diffusion/model/nets/PixArt.py).")
    with isolated_imports(root, [root], _stubs(), _PACKAGES, owned=_OURS):
        pixart = importlib.import_module("diffusion.model.nets.PixArt")
        dpms = importlib.import_module("diffusion.dpm_solver")
        cache = importlib.import_module("diffusion.model.cache_functions")
    return types.SimpleNamespace(pixart=pixart, dpms=dpms, cache=cache)


# ---------------------------------------------------------------------------------- checkpoint keys
def _key_pairs(depth: int) -> tuple[dict, dict]:
    """(diffusers module -> reference module for the 1:1 Linear layers and tables, reference fused Linear ->
    the diffusers Linears it splits into by rows), after diffusers' convert_pixart_alpha_to_diffusers."""
    same = {"pos_embed.proj": "x_embedder.proj", "proj_out": "final_layer.linear",
            "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
            "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2", "adaln_single.linear": "t_block.1",
            "caption_projection.linear_1": "y_embedder.y_proj.fc1",
            "caption_projection.linear_2": "y_embedder.y_proj.fc2"}
    fused = {}
    for b in range(depth):
        src, dst = f"blocks.{b}.", f"transformer_blocks.{b}."
        same.update({dst + "attn1.to_out.0": src + "attn.proj", dst + "attn2.to_q": src + "cross_attn.q_linear",
                     dst + "attn2.to_out.0": src + "cross_attn.proj", dst + "ff.net.0.proj": src + "mlp.fc1",
                     dst + "ff.net.2": src + "mlp.fc2"})
        fused[src + "attn.qkv"] = [dst + "attn1.to_q", dst + "attn1.to_k", dst + "attn1.to_v"]
        fused[src + "cross_attn.kv_linear"] = [dst + "attn2.to_k", dst + "attn2.to_v"]
    return same, fused


def to_diffusers(state: dict, depth: int) -> dict:
    """Reference PixArt-alpha state dict -> diffusers ``PixArtTransformer2DModel`` keys (fused qkv / kv split
    by rows; ``pos_embed`` and the null caption ``y_embedder.y_embedding`` have no diffusers counterpart)."""
    same, fused = _key_pairs(depth)
    out = {"scale_shift_table": state["final_layer.scale_shift_table"]}
    out.update({f"transformer_blocks.{b}.scale_shift_table": state[f"blocks.{b}.scale_shift_table"]
                for b in range(depth)})
    for kind in ("weight", "bias"):
        out.update({f"{dst}.{kind}": state[f"{src}.{kind}"] for dst, src in same.items()})
        for src, parts in fused.items():
            out.update({f"{dst}.{kind}": w for dst, w in zip(parts, state[f"{src}.{kind}"].chunk(len(parts)))})
    return out


def to_reference(state: dict, depth: int) -> dict:
    """The inverse of :func:`to_diffusers` (the fixture's model is built in diffusers by tests/pixart_helpers.py)."""
    same, fused = _key_pairs(depth)
    out = {"final_layer.scale_shift_table": state["scale_shift_table"]}
    out.update({f"blocks.{b}.scale_shift_table": state[f"transformer_blocks.{b}.scale_shift_table"]
                for b in range(depth)})
    for kind in ("weight", "bias"):
        out.update({f"{src}.{kind}": state[f"{dst}.{kind}"] for dst, src in same.items()})
        out.update({f"{src}.{kind}": torch.cat([state[f"{d}.{kind}"] for d in parts]) for src, parts in fused.items()})
    return out


# ---------------------------------------------------------------------------------- driving the reference
def cut_gap(score, k: int) -> float | None:
    """Smallest gap between the k-th and (k+1)-th score of any row (None when nothing is cut)."""
    if score is None or k == 0 or k >= score.shape[1]:
        return None
    top = score.sort(dim=-1, descending=True).values
    return float((top[:, k - 1] - top[:, k]).min())


@contextlib.contextmanager
def record_reference(ref, log: dict, force_all: bool = False):
    """Wrap the reference's ``global_force_fresh`` and ``cache_cutfresh`` (the names its PixArt module calls) to
    log its block decisions ``{(step, layer): full}`` and selections ``{(step, layer, module): (tokens, gap at
    the cut)}``; ``force_all``: every module computes fully (the reference's uncached run)."""
    mod, cut = ref.pixart, ref.pixart.cache_cutfresh
    gff, original_cut = mod.global_force_fresh, mod.cache_cutfresh
    score_of = cut.__globals__  # cache_cutfresh's module: score_evaluate, local_selection_with_bonus

    def force(cache_dic, current):
        flag = True if force_all else gff(cache_dic, current)
        log["full"][(current["step"], current["layer"])] = bool(flag)
        return flag

    def cutfresh(cache_dic, tokens, current):
        score = score_of["score_evaluate"](cache_dic, tokens, current)  # the attention score: no side effects
        score = score_of["local_selection_with_bonus"](score, 0.4, 4)
        index, fresh = original_cut(cache_dic, tokens, current)
        key = (current["step"], current["layer"], current["module"])
        log["select"][key] = (index.clone(), cut_gap(score, index.shape[1]))
        return index, fresh

    mod.global_force_fresh, mod.cache_cutfresh = force, cutfresh
    try:
        yield
    finally:
        mod.global_force_fresh, mod.cache_cutfresh = gff, original_cut
