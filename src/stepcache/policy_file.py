"""Policy files: a tuned ``PolicyConfig`` with what it was tuned for, and a loader that checks it.

A policy's settings are only good for the model, sampler and step count they were measured on (an
interval of 3 at DDIM-50 is a different schedule at DDIM-20; an L2C router is one step count's table).
So the file written by ``stepcache tune`` records that context, and :func:`load_policy` refuses to hand
the policy to another one unless told to (``force=True`` / ``--force``).

Format (JSON): ``{"format": "stepcache-policy/1", "policy": PolicyConfig.to_dict(), "label": ...,
"tuned_for": {"model": {...}, "sampler", "num_steps", "cfg_scale", "target"}, "measured": {...}}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from stepcache.core.policy import PolicyConfig
from stepcache.errors import ConfigError

FORMAT = "stepcache-policy/1"


def weights_fingerprint(model: torch.nn.Module, per_tensor: int = 64) -> str:
    """16 hex digits from every parameter's name, shape and first values: tells weights apart without
    hashing gigabytes."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(f"{name}{tuple(p.shape)}".encode())
        if p.is_floating_point():
            h.update(p.detach().flatten()[:per_tensor].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def is_pipeline(obj) -> bool:
    """A diffusers pipeline (holds a ``transformer``; is not itself a module)."""
    return not isinstance(obj, torch.nn.Module) and isinstance(getattr(obj, "transformer", None), torch.nn.Module)


def model_identity(model, name: str | None = None) -> dict:
    """``{"name", "class", "config", "fingerprint"}`` of a model (its architecture and its weights).

    Of a diffusers pipeline: its transformer's, plus ``"pipeline"`` and ``"scheduler"`` (class names): a
    policy's settings are tied to the scheduler's timesteps as much as to the weights.
    """
    if is_pipeline(model):
        return {**model_identity(model.transformer, name), "pipeline": type(model).__name__,
                "scheduler": type(model.scheduler).__name__}
    cfg = getattr(model, "config", None)
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    config = json.loads(json.dumps(dict(cfg) if cfg is not None else {}, sort_keys=True, default=str))
    return {"name": name or type(model).__name__, "class": type(model).__name__, "config": config,
            "fingerprint": weights_fingerprint(model)}


def save_policy(path, policy: PolicyConfig, tuned_for: dict, measured: dict | None = None, **extra) -> Path:
    """Write a policy file (parent folders made); returns the path."""
    doc = {"format": FORMAT, "policy": policy.to_dict(), "tuned_for": tuned_for, "measured": measured or {}, **extra}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def read_policy_file(path) -> dict:
    """The parsed document; a missing, unreadable or foreign file raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Policy file {path} does not exist.")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not a JSON policy file.") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("policy"), dict):
        raise ConfigError(f"{path} is not a stepcache policy file (no {FORMAT!r} format tag).")
    return doc


def _model_difference(tuned: dict, model) -> str | None:
    """Why ``model`` (a name or a module) is not the one the policy was tuned for, or None."""
    if isinstance(model, str):
        return None if model == tuned.get("name") else f"model {tuned.get('name')!r}, not {model!r}"
    ident = model_identity(model)
    for key in ("pipeline", "scheduler"):  # checked only where both sides are pipelines
        if key in tuned and key in ident and tuned[key] != ident[key]:
            return f"a {tuned[key]}, not a {ident[key]}"
    if ident["class"] != tuned.get("class"):
        return f"a {tuned.get('class')} model, not a {ident['class']}"
    old = tuned.get("config", {})
    for key in sorted(set(old) | set(ident["config"])):
        if old.get(key) != ident["config"].get(key):
            return f"a model with {key}={old.get(key)!r}, not {ident['config'].get(key)!r}"
    if ident["fingerprint"] != tuned.get("fingerprint"):
        return (f"other weights of this architecture (fingerprint {tuned.get('fingerprint')}, "
                f"not {ident['fingerprint']})")
    return None


def load_policy(path, model=None, sampler: str | None = None, num_steps: int | None = None,
                force: bool = False) -> PolicyConfig:
    """The policy of a file written by ``stepcache tune``, checked against the run it will serve.

    ``model`` (a name such as ``"embedded"``, the module itself or a diffusers pipeline), ``sampler``
    (for a pipeline: its scheduler's class name) and ``num_steps`` are
    compared with what the policy was tuned for; a difference raises ConfigError naming it, unless
    ``force``. Arguments left None are not checked.
    """
    doc = read_policy_file(path)
    tuned = doc.get("tuned_for", {})
    problems = []
    if model is not None and tuned.get("model") is not None:
        diff = _model_difference(tuned["model"], model)
        if diff:
            problems.append(diff)
    if sampler is not None and tuned.get("sampler") not in (None, sampler):
        problems.append(f"sampler {tuned['sampler']!r}, not {sampler!r}")
    if num_steps is not None and tuned.get("num_steps") not in (None, num_steps):
        problems.append(f"{tuned['num_steps']} sampling steps, not {num_steps}")
    if problems and not force:
        raise ConfigError(f"{path} was tuned for {problems[0]}; tune again for this run or force it "
                          f"(force=True, --force).")
    return PolicyConfig.from_dict(doc["policy"])
