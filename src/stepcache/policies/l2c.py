"""Learning-to-Cache (Ma et al., "Learning-to-Cache: Accelerating Diffusion Transformer via Layer
Caching", NeurIPS 2024, arXiv 2406.01733).

A router is one learned logit vector per respaced step index ``i``: ``prob[i]`` of length
``2 * depth``; entry ``2l`` gates layer ``l``'s attention branch, ``2l + 1`` its MLP branch, and
``beta = sigmoid(prob)``. Steps go in pairs: odd ``i`` (``S-1, S-3, ...``) are full steps, even
``i`` are cache steps whose cache is the un-gated branch outputs of step ``i + 1``. At a cache step
a branch is recomputed iff ``beta[i, unit] > threshold`` (strictly greater, as the reference's
straight-through threshold), otherwise reused; gates are recomputed at every step. With an odd
``S`` the first step (even, nothing cached yet) is computed in full, as in the reference loop.

Router files: the reference's pickled training checkpoints (``{'routers': {'i.prob': ...}, 'opt',
'args'}``, or bare ``{'i.prob': ...}`` dicts) are read with ``torch.load(weights_only=True)`` and
only ``argparse.Namespace`` allowed besides tensors; stepcache's own format is a safetensors file
holding ``routers`` (S, 2*depth) float32 with JSON metadata (see :func:`save_router`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from stepcache.errors import CheckpointError, ConfigError, ModelMismatchError, UnsupportedModelError
from stepcache.core.policy import Policy, PolicyConfig, register_policy
from stepcache.core.actions import COMPUTE, REUSE

FORMAT = "stepcache.l2c-router"
FORMAT_VERSION = 1
BRANCH_OFFSET = {"attn": 0, "mlp": 1}


# ---------------------------------------------------------------------------------------- step math
def is_cache_step(i: int, num_steps: int) -> bool:
    """Even ``i`` with a full step ``i + 1`` before it (i counts down from ``S - 1``)."""
    return i % 2 == 0 and i + 1 < num_steps


def cache_steps(num_steps: int) -> list[int]:
    """Cache-step indices, descending: S-2, S-4, ..., 0 for even S."""
    return [i for i in range(num_steps - 1, -1, -1) if is_cache_step(i, num_steps)]


def unit_index(layer: int, branch: str) -> int:
    """Router entry of (layer, branch): 2l for attention, 2l + 1 for the MLP."""
    try:
        return 2 * layer + BRANCH_OFFSET[branch]
    except KeyError:
        raise UnsupportedModelError(f"L2C routes only 'attn' and 'mlp' branches, not {branch!r}.") from None


def recompute_mask(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """(S, 2*depth) logits -> bool (S, 2*depth): True where a unit is recomputed on a cache step.

    ``sigmoid`` in float32 and a strict ``>``, exactly the reference's decision. Rows of full
    steps are all True (everything is computed there).
    """
    keep = torch.sigmoid(logits.float()) > threshold  # (S, 2D)
    S = logits.shape[0]
    full = torch.tensor([not is_cache_step(i, S) for i in range(S)])  # (S,)
    return keep | full[:, None]


def active_units(logits: torch.Tensor, threshold: float) -> dict:
    """Units recomputed over all cache steps, in the reference's accounting (560 for DDIM-20, DiT-XL/2)."""
    S = logits.shape[0]
    rows = cache_steps(S)
    keep = recompute_mask(logits, threshold)[rows] if rows else torch.zeros(0, logits.shape[1], dtype=torch.bool)
    total = keep.numel()
    active = int(keep.sum())
    return {
        "total": total,
        "active": active,
        "attn_active": int(keep[:, 0::2].sum()),
        "mlp_active": int(keep[:, 1::2].sum()),
        "attn_total": total // 2,
        "mlp_total": total // 2,
        "skipped_share": 1.0 - active / total if total else 0.0,
        "per_step": {i: int(k.sum()) for i, k in zip(rows, keep)},
    }


# ---------------------------------------------------------------------------------------- config
def _as_rows(router) -> tuple[tuple[float, ...], ...]:
    if isinstance(router, torch.Tensor):
        router = router.detach().cpu().float().tolist()
    try:
        rows = tuple(tuple(float(v) for v in row) for row in router)
    except TypeError:
        raise ConfigError("L2C router must be a 2-D table (steps x 2*depth) of logits.") from None
    if not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise ConfigError("L2C router must be a non-empty rectangular table (steps x 2*depth) of logits.")
    if len(rows[0]) % 2:
        raise ConfigError(f"L2C router rows must have 2*depth entries (an even number), got {len(rows[0])}.")
    if not all(math.isfinite(v) for r in rows for v in r):
        raise ConfigError("L2C router logits must all be finite numbers.")
    return rows


@dataclass(frozen=True)
class L2C(PolicyConfig):
    """``L2C(router, threshold=0.1)``: ``router`` holds the logits (S rows of 2*depth floats).

    Build one with :meth:`from_checkpoint`; ``router`` may be given as a tensor or nested lists and
    is stored as a tuple of tuples, so the config stays hashable and round-trips through JSON.
    """

    router: tuple = field(repr=False)
    threshold: float = 0.1
    method: ClassVar[str] = "l2c"

    @classmethod
    def search_space(cls) -> dict[str, list]:
        return {"threshold": [0.05, 0.1, 0.2, 0.3, 0.5, 0.7]}  # the router comes from the run's context

    def __post_init__(self) -> None:
        object.__setattr__(self, "router", _as_rows(self.router))
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 <= float(self.threshold) <= 1.0:
            raise ConfigError(f"L2C threshold must be a number in [0, 1], got {self.threshold!r}.")
        object.__setattr__(self, "threshold", float(self.threshold))

    @property
    def num_steps(self) -> int:
        return len(self.router)

    @property
    def depth(self) -> int:
        return len(self.router[0]) // 2

    def logits(self) -> torch.Tensor:
        """(S, 2*depth) float32."""
        return torch.tensor(self.router, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"L2C(steps={self.num_steps}, depth={self.depth}, threshold={self.threshold})"

    @classmethod
    def from_checkpoint(cls, path, threshold: float | None = None, *, model=None, num_steps: int | None = None,
                        sampler: str | None = None) -> "L2C":
        """Load a reference ``.pt`` router or a stepcache ``.safetensors`` router.

        ``threshold=None`` uses the threshold recorded in a stepcache file, else 0.1 (the paper's
        value for DiT-XL/2 256). Given ``model``, ``num_steps`` or ``sampler``, the router is checked
        against them now (:func:`check_router`), before any sampling time is spent.
        """
        logits, meta = load_router(path)
        check_router(logits, meta, path, model=model, num_steps=num_steps, sampler=sampler)
        if threshold is None:
            threshold = float(meta.get("threshold", 0.1))
        return cls(router=logits, threshold=threshold)


# ---------------------------------------------------------------------------------------- handler
@register_policy(L2C)
class L2CPolicy(Policy):
    """Full steps compute; cache steps look the (step, unit) up in a precomputed table.

    Only the self-attention (``attn``) and MLP (``mlp``) branches are routed, as in the paper; any
    other branch an adapter declares (cross-attention) is computed at every step.
    """

    def __init__(self, config: L2C, info):
        super().__init__(config, info)
        if not {"attn", "mlp"} <= set(info.branches):
            raise UnsupportedModelError(f"L2C needs attention and MLP branches; this model has {info.branches}.")
        if config.depth != info.depth:
            raise ModelMismatchError(f"The L2C router was made for a {config.depth}-layer model but this "
                                     f"model has {info.depth} layers.")
        self.keep = recompute_mask(config.logits(), config.threshold).tolist()  # [S][2D] bool
        self.staged = None

    def reset(self, run) -> None:
        self.staged = None
        if run.stages > 1:  # DPM-Solver++(2S): cache steps are step starts, see policies/l2c_dpm.py
            from stepcache.policies.l2c_dpm import StagedRouter

            self.staged = StagedRouter(self.config, run)
            return super().reset(run)
        if run.num_steps != self.config.num_steps:
            raise ModelMismatchError(f"The L2C router was made for {self.config.num_steps} sampling steps but "
                                     f"this run has {run.num_steps}.")
        super().reset(run)

    def decide(self, ctx, site, view):
        if self.staged is not None:
            return self.staged.decide(ctx, site.layer, site.name)
        layer, offset = site.layer, BRANCH_OFFSET.get(site.name)
        if offset is None:  # e.g. cross-attention: not routed by L2C, always computed
            return COMPUTE
        return COMPUTE if self.keep[ctx.i][2 * layer + offset] else REUSE


# ---------------------------------------------------------------------------------------- files
def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise CheckpointError(f"{path} is too short to be a router file.")
    if head[8:9] == b"{":
        return "safetensors"
    return "pickle"


def load_router(path) -> tuple[torch.Tensor, dict]:
    """(logits (S, 2*depth) float32, metadata dict) from either router format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Router file {path} does not exist.")
    if _sniff(path) == "safetensors":
        return _load_own(path)
    return _load_reference(path), {"format": "reference", "source": str(path)}


def _load_own(path: Path) -> tuple[torch.Tensor, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta_text = (f.metadata() or {}).get("stepcache")
            if "routers" not in f.keys():
                raise CheckpointError(f"{path} is a safetensors file without a 'routers' tensor.")
            logits = f.get_tensor("routers")
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors router file ({type(exc).__name__}).") from None
    try:
        meta = json.loads(meta_text) if meta_text else {}
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has corrupt JSON metadata.") from None
    if meta and meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a stepcache L2C router.")
    _check_logits(logits, path)
    depth = meta.get("depth")
    if depth is not None and logits.shape[1] != 2 * int(depth):
        raise CheckpointError(f"{path} says depth {depth} but its router has {logits.shape[1]} entries per step.")
    return logits.float().contiguous(), meta


def _torch_load_safely(path: Path):
    import argparse
    import pickle

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise CheckpointError(f"{path} contains {found.group(1)}, which is neither a tensor nor the training "
                                  "script's argparse.Namespace; refusing to unpickle it.") from None
        raise CheckpointError(f"{path} is corrupt or not a router checkpoint.") from None
    except Exception as exc:  # torch.load hands .safetensors names to safetensors, whose errors are untyped
        raise CheckpointError(f"{path} is corrupt or not a router checkpoint ({type(exc).__name__}).") from None


def _load_reference(path: Path) -> torch.Tensor:
    obj = _torch_load_safely(path)
    routers = obj.get("routers", obj) if isinstance(obj, dict) else None
    if not isinstance(routers, dict) or not routers:
        raise CheckpointError(f"{path} holds no router table ('routers' -> {{'i.prob': tensor}}).")
    rows = {}
    for key, value in routers.items():
        idx, _, name = str(key).partition(".")
        if name != "prob" or not idx.isdigit() or not isinstance(value, torch.Tensor) or value.dim() != 1:
            raise CheckpointError(f"{path} has an unexpected router entry {key!r}; expected 'i.prob' vectors.")
        rows[int(idx)] = value
    if sorted(rows) != list(range(len(rows))):
        raise CheckpointError(f"{path} does not hold one router per step 0..{len(rows) - 1}.")
    if len({v.numel() for v in rows.values()}) != 1:
        raise CheckpointError(f"{path} has routers of different lengths.")
    logits = torch.stack([rows[i].float() for i in range(len(rows))])  # (S, 2D)
    _check_logits(logits, path)
    return logits


def check_router(logits: torch.Tensor, meta: dict, path, *, model=None, num_steps: int | None = None,
                 sampler: str | None = None) -> None:
    """Refuse a router made for another step count, sampler or model architecture, in one sentence.

    A router is learned for one sampler's trajectory (a DDIM-50 router says nothing about DDPM-50) and
    for one model; reference files record neither, so for them only depth and step count are checked.
    """
    evaluations = num_steps * (2 if sampler and sampler.startswith("dpm-solver") else 1) if num_steps else None
    if evaluations is not None and logits.shape[0] != evaluations:  # DPM-Solver++(2S): one router per evaluation
        raise ModelMismatchError(f"The L2C router {path} was made for {logits.shape[0]} sampling steps (model "
                                 f"evaluations), not {evaluations}.")
    made_for = meta.get("sampler")
    if sampler is not None and made_for is not None and made_for != sampler:
        raise ModelMismatchError(f"The L2C router {path} was made for the {made_for} sampler, not {sampler}.")
    if model is None:
        return
    depth = len(getattr(model, "blocks", ())) or getattr(getattr(model, "config", None), "depth", None)
    if depth and logits.shape[1] != 2 * depth:
        raise ModelMismatchError(f"The L2C router {path} was made for a {logits.shape[1] // 2}-layer model but "
                                 f"this model has {depth} layers.")
    recorded = meta.get("model", {}).get("config") if isinstance(meta.get("model"), dict) else None
    config = getattr(model, "config", None)
    if isinstance(recorded, dict) and config is not None:
        from dataclasses import asdict

        ours = asdict(config)
        differing = [k for k in sorted(recorded) if k in ours and recorded[k] != ours[k]]
        if differing:
            k = differing[0]
            raise ModelMismatchError(f"The L2C router {path} was made for another model ({k} {recorded[k]!r}, "
                                     f"this model has {ours[k]!r}).")


def _check_logits(logits: torch.Tensor, path) -> None:
    if logits.dim() != 2 or logits.shape[0] < 1 or logits.shape[1] < 2 or logits.shape[1] % 2:
        raise CheckpointError(f"{path} has a router of shape {tuple(logits.shape)}; expected (steps, 2*depth).")
    if not torch.isfinite(logits).all():
        raise CheckpointError(f"{path} has non-finite router logits.")


def router_metadata(logits: torch.Tensor, **fields) -> dict:
    """The JSON metadata of a stepcache router file (depth and step count come from ``logits``)."""
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "num_steps": int(logits.shape[0]),
            "depth": int(logits.shape[1]) // 2}
    meta.update({k: v for k, v in fields.items() if v is not None})
    return meta


def save_router(path, logits: torch.Tensor, *, sidecar: bool = True, extra_tensors: dict | None = None,
                **fields) -> dict:
    """Write ``logits`` (S, 2*depth) as a stepcache router (atomic); returns the metadata.

    ``fields``: model (identity dict or name), sampler, threshold, lambda, lr, iters... ``sidecar``
    also writes the metadata as ``<path>.json`` for people; the safetensors metadata is authoritative.
    """
    from safetensors.torch import save

    from stepcache.io import atomic_write

    logits = logits.detach().cpu().float().contiguous()
    _check_logits(logits, path)
    meta = router_metadata(logits, **fields)
    tensors = {"routers": logits}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()})
    blob = save(tensors, metadata={"stepcache": json.dumps(meta, default=str)})
    atomic_write(Path(path), lambda f: f.write(blob))
    if sidecar:
        text = json.dumps({**meta, "units": _summary(logits, meta.get("threshold", 0.1))}, indent=2, default=str)
        atomic_write(Path(path).with_suffix(".json"), lambda f: f.write(text.encode()))
    return meta


def _summary(logits: torch.Tensor, threshold: float) -> dict:
    counts = active_units(logits, float(threshold))
    counts.pop("per_step")
    return {"threshold": float(threshold), **counts}
