"""Import the ToCa repository's OpenSora v1.2 code (STDiT3, rectified flow, ToCa's cache functions) on a CPU.

Nothing of the reference is shipped: ``--ref-dir`` points to an extracted ``Open-Sora`` folder of
Shenyi-Z/ToCa. Its package ``__init__`` files import every model family and GPU library, so the packages on
the way are created empty (``__path__`` only) and only the modules needed are executed. GPU-only or heavy
imports are replaced by small stand-ins written here: ``xformers`` (only ``BlockDiagonalMask``, which the
cross-attention materialises into an additive 0/-inf mask), ``mmengine``'s registry, ``timm``'s ``Mlp`` and
``DropPath`` (timm needs torchvision) and the checkpoint utilities (colossalai). ``einops`` and
``rotary_embedding_torch`` (0.5.3) are the real packages, from the environment or ``deps_dir``.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from pathlib import Path

import torch
from torch import nn

_PACKAGES = ("opensora", "opensora.models", "opensora.models.stdit", "opensora.models.layers",
             "opensora.schedulers", "opensora.schedulers.iddpm", "opensora.utils",
             "opensora.acceleration")


class _BlockDiagonalMask:
    """xformers' BlockDiagonalMask, as the reference uses it: query blocks of q_seqlen rows see key block i."""

    def __init__(self, q_seqlen, kv_seqlen):
        self.q_seqlen, self.kv_seqlen = list(q_seqlen), list(kv_seqlen)

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None):
        return cls(q_seqlen, kv_seqlen if kv_seqlen is not None else q_seqlen)

    def materialize(self, shape, dtype=torch.float32, device="cpu"):
        mask = torch.full((sum(self.q_seqlen), sum(self.kv_seqlen)), float("-inf"), dtype=dtype, device=device)
        q0 = k0 = 0
        for nq, nk in zip(self.q_seqlen, self.kv_seqlen):
            mask[q0:q0 + nq, k0:k0 + nk] = 0
            q0, k0 = q0 + nq, k0 + nk
        return mask.expand(shape)


class _Mlp(nn.Module):
    """timm's vision-transformer Mlp: fc1, act, fc2 (dropout 0, no norm)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0, **_):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features or in_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features or in_features, out_features or in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Registry:
    def __init__(self, *args, **kwargs):
        self.modules = {}

    def register_module(self, name=None, module=None, **_):
        def wrap(obj):
            self.modules[name or obj.__name__] = obj
            return obj

        return wrap


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def _stubs() -> dict:
    fmha = _module("xformers.ops.fmha", BlockDiagonalMask=_BlockDiagonalMask)
    fmha.attn_bias = _module("xformers.ops.fmha.attn_bias", BlockDiagonalMask=_BlockDiagonalMask)
    ops = _module("xformers.ops", fmha=fmha)
    layers = _module("timm.models.layers", DropPath=nn.Identity)
    vit = _module("timm.models.vision_transformer", Mlp=_Mlp)
    return {
        "xformers": _module("xformers", ops=ops), "xformers.ops": ops, "xformers.ops.fmha": fmha,
        "xformers.ops.fmha.attn_bias": fmha.attn_bias,
        "mmengine": _module("mmengine"), "mmengine.registry": _module("mmengine.registry", Registry=_Registry),
        "timm": _module("timm"), "timm.models": _module("timm.models", layers=layers, vision_transformer=vit),
        "timm.models.layers": layers, "timm.models.vision_transformer": vit,
        "opensora.utils.ckpt_utils": _module("opensora.utils.ckpt_utils", load_checkpoint=None),
    }


def load(ref_dir: Path, deps_dir: Path | None = None) -> types.SimpleNamespace:
    """The reference's STDiT3 module, RFLOW sampler class and ``cache_functions`` package, imported in
    isolation (the ``opensora`` and stub names leave ``sys.modules`` afterwards; the loaded modules stay
    reachable through the returned namespace)."""
    root = Path(ref_dir)
    if not (root / "opensora" / "models" / "stdit" / "stdit3.py").exists():
        raise SystemExit(f"{root} is not the Open-Sora folder of Shenyi-Z/ToCa (no opensora/models/stdit/stdit3.py).")
    paths = [root] + ([Path(deps_dir)] if deps_dir else [])
    with isolated_imports(root, paths, _stubs(), _PACKAGES, owned=("opensora", "xformers", "mmengine", "timm")):
        stdit3 = importlib.import_module("opensora.models.stdit.stdit3")
        rf = importlib.import_module("opensora.schedulers.rf")
        cache = importlib.import_module("opensora.models.cache_functions")
        gff = importlib.import_module("opensora.models.cache_functions.global_force_fresh")
    return types.SimpleNamespace(stdit3=stdit3, rf=rf, cache=cache, global_force_fresh=gff)


@contextlib.contextmanager
def isolated_imports(root: Path, paths: list, stubs: dict, packages: tuple, owned: tuple):
    """Import reference code inside: ``paths`` first on ``sys.path``, the ``stubs`` for its GPU-only imports,
    and ``packages`` (dotted names under ``root``) as bare namespace packages (their ``__init__`` files pull
    in training code). Afterwards ``sys.path`` and every ``sys.modules`` entry whose top-level name is in
    ``owned`` are as they were (never torch's own lazy imports); the imported modules stay reachable."""
    saved = dict(sys.modules)
    sys.path[:0] = [str(p) for p in paths]
    try:
        sys.modules.update(stubs)
        for name in packages:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(root / name.replace(".", "/"))]
            sys.modules[name] = pkg
        yield
    finally:
        del sys.path[:len(paths)]
        for k in [k for k in sys.modules if k.split(".")[0] in owned]:
            sys.modules.pop(k)
        sys.modules.update({k: v for k, v in saved.items() if k.split(".")[0] in owned})
