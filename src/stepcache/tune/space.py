"""The candidates of a tune: every registered policy times its declared ``search_space()``.

The tuner knows no method by name. It reads the registry (:func:`stepcache.core.policy.known_methods`),
takes the cartesian product of each config class's search space, and builds every point through the
same spec builder the benchmarks use (:func:`stepcache.bench.methods.build_policy`), which is where a
setting that needs the run's context (an L2C router made for this model and step count) is resolved.
A method that cannot run here (no router, not implemented) is reported once with its reason.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

from stepcache.bench.methods import build_policy, method_unavailable, policy_key_dict
from stepcache.bench.records import config_key
from stepcache.core.policy import PolicyConfig, known_methods, policy_class
from stepcache.errors import StepcacheError


@dataclass(frozen=True)
class Candidate:
    """One point of the search: a method and the searched settings, the built config, its record key."""

    method: str
    params: tuple  # ((setting, value), ...) in the search space's order
    policy: PolicyConfig
    key: str       # digest of the policy's identity (an L2C router by the digest of its table)

    @property
    def label(self) -> str:
        return f"{self.method}({', '.join(f'{k}={v}' for k, v in self.params)})" if self.params else self.method


def grid(space: dict) -> list[dict]:
    """The cartesian product of ``{setting: [values]}`` as dicts, in declaration order ({} -> [{}])."""
    names = list(space)
    return [dict(zip(names, values)) for values in itertools.product(*(list(space[n]) for n in names))]


def spec_of(method: str, params: dict) -> str:
    """``"toca:interval=3,fresh_ratio=0.1"``: values written as JSON, so the spec parser reads them back."""
    return method + (":" + ",".join(f"{k}={json.dumps(v)}" for k, v in params.items()) if params else "")


def candidate(method: str, params: dict, num_steps: int, sampler: str, embedded: bool) -> Candidate:
    """Build one point; a value that cannot travel in a spec string goes through ``from_dict``."""
    if all(isinstance(v, (int, float, str, bool)) and "," not in json.dumps(v) for v in params.values()):
        policy = build_policy(spec_of(method, params), num_steps, sampler, embedded)
    else:
        policy = PolicyConfig.from_dict({"method": method, **params})
    return Candidate(method, tuple(params.items()), policy, config_key(policy_key_dict(policy)))


def enumerate_candidates(num_steps: int, sampler: str, embedded: bool, methods=None,
                         log=print) -> list[Candidate]:
    """Every buildable point of every registered method that declares a search space (or of
    ``methods``), duplicates removed.

    A point whose settings its config refuses (e.g. DBCache front + back deeper than the model allows
    is only known later; a bad combination of values now) is skipped silently: the search space is a
    grid and not every corner of it need be valid.
    """
    names = [m for m in known_methods() if m != "none"]
    if methods:
        unknown = sorted(set(methods) - set(names))
        if unknown:
            policy_class(unknown[0])  # raises the registry's one sentence naming the known methods
        names = [m for m in names if m in methods]
    out, seen = [], set()
    for method in names:
        reason = method_unavailable(method, num_steps, sampler, embedded)
        if reason:
            log(f"tune: skipping {method}: {reason}")
            continue
        space = policy_class(method).search_space()
        if not space:  # declaring a search space is how a method opts in (internal policies never do)
            log(f"tune: skipping {method}: it declares no search space")
            continue
        for params in grid(space):
            try:
                cand = candidate(method, params, num_steps, sampler, embedded)
            except StepcacheError:
                continue
            if cand.key not in seen:
                seen.add(cand.key)
                out.append(cand)
    return out
