"""Policy specs for sweeps: ``"fora:interval=3"`` -> ``FORA(interval=3)``, through the policy registry.

A spec is ``method[:key=value,key=value...]``; values are read as JSON where they parse (numbers,
booleans) and as strings otherwise. L2C needs a router: ``l2c:router=PATH,threshold=0.1``, or, on the
embedded model, the shipped ``stepcache/assets/embedded_router_*.safetensors`` made for the run's step
count (found by its metadata).
"""

from __future__ import annotations

import json
from pathlib import Path

from stepcache.errors import CheckpointError, ConfigError
from stepcache.core.policy import NoCache, PolicyConfig, known_methods

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"toca:interval=3,fresh_ratio=0.1"`` -> ``("toca", {"interval": 3, "fresh_ratio": 0.1})``."""
    method, _, rest = spec.strip().partition(":")
    params = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"Bad policy setting {item!r} in {spec!r}; write key=value.")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value.strip()
    return method.strip().lower(), params


def embedded_router(num_steps: int, sampler: str) -> Path | None:
    """The shipped embedded-model L2C router made for ``num_steps`` steps (and ``sampler`` if recorded)."""
    from stepcache.policies.l2c import load_router

    for path in sorted(ASSETS.glob("embedded_router_*.safetensors")):
        try:
            logits, meta = load_router(path)
        except CheckpointError:
            continue
        if logits.shape[0] == num_steps and meta.get("sampler", sampler) == sampler:
            return path
    return None


def policy_file_spec(spec: str) -> tuple[str, bool] | None:
    """``"policy.json"`` or ``"policy.json:force=true"`` (a file written by ``stepcache tune``) ->
    (path, force); None for a method spec."""
    path, dot, rest = spec.strip().partition(".json")
    if not dot:
        return None
    force = parse_spec("file" + rest)[1].pop("force", False) if rest else False
    return path + dot, bool(force)


def method_unavailable(method: str, num_steps: int, sampler: str, embedded: bool) -> str | None:
    """Why ``method`` cannot run here (one sentence), or None when it can."""
    if method == "none" or method.endswith(".json"):  # a policy file is checked when it is loaded
        return None
    if method not in known_methods():
        return f"{method} is not implemented in this stepcache build"
    if method == "l2c" and not (embedded and embedded_router(num_steps, sampler)):
        return f"no shipped L2C router for the embedded model with {sampler}-{num_steps}"
    return None


def build_policy(spec: str, num_steps: int, sampler: str, embedded: bool = True) -> PolicyConfig:
    """The policy config of ``spec`` for a run of ``num_steps`` steps of ``sampler``; a policy file is
    refused when it was tuned for another step count, sampler or (on the embedded model) model."""
    file_spec = policy_file_spec(spec)
    if file_spec is not None:
        from stepcache.policy_file import load_policy

        return load_policy(file_spec[0], model="embedded" if embedded else None, sampler=sampler,
                           num_steps=num_steps, force=file_spec[1])
    method, params = parse_spec(spec)
    if method == "none":
        if params:
            raise ConfigError(f"The 'none' policy takes no settings, got {params}.")
        return NoCache()
    if method == "l2c":
        from stepcache.policies.l2c import L2C

        router = params.pop("router", None)
        path = Path(router) if router else (embedded_router(num_steps, sampler) if embedded else None)
        if path is None:
            raise CheckpointError(f"L2C needs a router for {sampler}-{num_steps}; pass l2c:router=PATH.")
        threshold = params.pop("threshold", None)
        if params:
            raise ConfigError(f"Unknown L2C settings {sorted(params)}; use router and threshold.")
        return L2C.from_checkpoint(path, threshold=threshold)
    try:
        return PolicyConfig.from_dict({"method": method, **params})
    except TypeError as exc:
        raise ConfigError(f"Bad settings for {method}: {exc}.") from None


def policy_label(policy: PolicyConfig) -> str:
    """Short human label: ``fora(interval=3)``; L2C shows its threshold, not its router table."""
    import dataclasses

    if policy.method == "l2c":
        return f"l2c(threshold={policy.threshold:g})"
    shown = [f"{f.name}={getattr(policy, f.name)}" for f in dataclasses.fields(policy)
             if (f.name in ("interval", "fresh_ratio") and getattr(policy, f.name) is not None)
             or getattr(policy, f.name) != f.default]
    return f"{policy.method}({', '.join(shown)})" if shown else policy.method


def policy_key_dict(policy: PolicyConfig) -> dict:
    """A JSON-able identity of ``policy`` (an L2C router is represented by a digest of its table)."""
    import hashlib

    d = policy.to_dict()
    if "router" in d:
        d["router"] = hashlib.sha256(json.dumps(d["router"]).encode()).hexdigest()[:16]
    return d
