"""Reference parity: stepcache's U-ViT, DPM-Solver++(2S) and L2C against the published L2C U-ViT code.

Needs the ``U-ViT`` folder of horseee/learning-to-cache passed as ``--ref-dir`` (``libs/uvit.py``,
``libs/uvit_dynamic.py``, ``libs/uvit_router.py``, ``dpm_solver_pp.py``, ``ckpt/dpm{20,50}_router.pth``);
it is NOT run in CI and nothing of the reference is shipped. Where ``einops`` is not installed, a
three-pattern stand-in for ``einops.rearrange`` (the only function the reference model uses) is put in
``sys.modules`` first.

For a random U-ViT of H/2 depth (28 + 1 blocks, narrow so it runs on a CPU) with the same weights in
both implementations, the same initial noise and labels, the script runs the reference's sampling
(``NoiseScheduleVP('discrete')`` on Stable Diffusion's betas, ``DPM_Solver(predict_x0=True).sample(...,
order=2, method='singlestep')``, CFG ``cond + 0.4 (cond - uncond)`` in two calls) plain (``libs/uvit.py``)
and with each published router (``libs/uvit_dynamic.py``, ``load_ranking``) at thresholds 0.1 and 0.9,
NFE 20 and 50, against ``stepcache.sample(..., sampler="dpm-solver++2s", cfg_scale=1.4, policy=L2C...)``;
and it counts the routers' active units as the reference's ``load_ranking`` does vs ``active_units``.

    .venv/bin/python benchmarks/uvit_parity.py --ref-dir /tmp/ref-uvit/U-ViT \\
        --out benchmarks/results/uvit_parity.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- reference
def _rearrange(x: torch.Tensor, pattern: str, **sizes) -> torch.Tensor:
    """The three ``einops.rearrange`` patterns of the reference U-ViT, written out by hand."""
    pattern = " ".join(pattern.split())
    if pattern == "B L (K H D) -> K B H L D":
        B, L, _ = x.shape
        return x.reshape(B, L, sizes["K"], sizes["H"], -1).permute(2, 0, 3, 1, 4)
    if pattern == "B H L D -> B L (H D)":
        B, H, L, D = x.shape
        return x.transpose(1, 2).reshape(B, L, H * D)
    if pattern == "B (h w) (p1 p2 C) -> B C (h p1) (w p2)":
        B, _, _ = x.shape
        h, p = sizes["h"], sizes["p1"]
        x = x.reshape(B, h, x.shape[1] // h, p, p, -1)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, x.shape[-1], h * p, x.shape[2] * p)
    raise NotImplementedError(f"einops stand-in does not know {pattern!r}")


def import_reference(ref_dir) -> types.SimpleNamespace:
    """(uvit, uvit_dynamic, dpm_solver_pp) modules of the reference folder, imported in isolation."""
    root = Path(ref_dir)
    if not (root / "libs" / "uvit_dynamic.py").is_file():
        raise SystemExit(f"{root} is not the U-ViT folder of horseee/learning-to-cache (no libs/uvit_dynamic.py).")
    try:
        importlib.import_module("einops")
    except ImportError:
        sys.modules["einops"] = types.SimpleNamespace(rearrange=_rearrange)
    names = ("libs", "libs.uvit", "libs.uvit_dynamic", "libs.uvit_router", "libs.timm", "dpm_solver_pp")
    saved = {k: sys.modules.pop(k) for k in names if k in sys.modules}
    sys.path.insert(0, str(root))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the reference prints its attention mode
            mods = {n.split(".")[-1]: importlib.import_module(n) for n in names[1:4] + names[5:]}
    finally:
        sys.path.remove(str(root))
        for k in names:
            sys.modules.pop(k, None)
        sys.modules.update(saved)
    return types.SimpleNamespace(root=root, **mods)
