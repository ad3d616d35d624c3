"""Policies: a frozen config dataclass plus a handler class, found through one registry.

The registry is the one menu of methods: the CLI, the benchmarks, the tuner and
``PolicyConfig.from_dict`` all read it, so a new method is one file that registers itself.

A handler (:class:`Policy`) is decision logic with a little state. For every site of every model
call the runtime asks ``decide(ctx, site, view)`` for an action (:mod:`stepcache.core.actions`) and
afterwards tells ``observe(ctx, site, result)`` what came out. The cached tensors live in the
runtime's store, per model call of a step (cond / uncond / k-th call) — never in the handler; state
that must be kept apart per call goes in the object ``new_call_state()`` returns, which the runtime
sets as ``self.state`` before each call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from stepcache.core.actions import COMPUTE
from stepcache.core.context import ModelInfo, RunInfo, SiteKey, StepContext
from stepcache.errors import ConfigError

_HANDLERS: dict[type, type] = {}
_BY_NAME: dict[str, type] = {}


@dataclass(frozen=True)
class PolicyConfig:
    """Base of every policy config. Subclasses are frozen dataclasses with a ``method`` name."""

    method: ClassVar[str] = "base"

    def to_dict(self) -> dict:
        return {"method": self.method, **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    @staticmethod
    def from_dict(d: dict) -> "PolicyConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"A policy must be given as a dict with a 'method', got {type(d).__name__}.")
        d = dict(d)
        name = d.pop("method", None)
        if name not in _BY_NAME:
            raise ConfigError(f"Unknown cache method {name!r}; known: {', '.join(sorted(_BY_NAME))}.")
        cls = _BY_NAME[name]
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no setting {unknown[0]!r}; "
                              f"its settings: {', '.join(sorted(fields))}.")
        return cls(**{k: cls.from_plain(k, v) for k, v in d.items()})

    @classmethod
    def from_plain(cls, name: str, value):
        """A setting as read back from JSON (subclasses rebuild nested configs here)."""
        return value

    @classmethod
    def search_space(cls) -> dict[str, list]:
        """Values of the tunable settings worth trying (the tuner's grid); {} for none."""
        return {}


def _plain(value):
    if isinstance(value, PolicyConfig):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class Policy:
    """Decision logic of one policy for one model; ``reset`` is called at the start of every run."""

    caches: ClassVar[bool] = True  # False: nothing is ever reused, so the runtime stores nothing
    needs_input: ClassVar[tuple[str, ...]] = ()  # branches whose decision reads ``view.input`` (no peeking)

    def __init__(self, config: PolicyConfig, info: ModelInfo):
        self.config = config
        self.info = info
        self.run: RunInfo | None = None
        self.state: Any = None

    def new_call_state(self) -> Any:
        """A fresh per-call state (cond / uncond / k-th call of a step); None if the policy keeps none."""
        return None

    def reset(self, run: RunInfo) -> None:
        self.run = run

    def spans(self) -> tuple[tuple[int, int], ...]:
        """Block spans (start, end) decided as one unit each, non-overlapping; () for none."""
        return ()

    def decide(self, ctx: StepContext, site: SiteKey, view) -> Any:
        return COMPUTE

    def observe(self, ctx: StepContext, site: SiteKey, result) -> None:
        """Called after a site ran (Compute, Partial or Blend): ``result.output`` (a branch's un-gated
        output (B, T, D), a span's residual), ``result.input``, and when the action asked for them
        ``result.attn_map`` (B, T, L) / ``result.values`` (B, H, T); after a ``Partial(need_map=True)``,
        ``attn_map`` (B, k, L) holds the rows of the recomputed queries ``result.index`` (B, k)."""


def register_policy(config_cls: type):
    """Class decorator: ``@register_policy(FORA) class ForaPolicy(Policy): ...``."""

    def wrap(handler_cls: type) -> type:
        _HANDLERS[config_cls] = handler_cls
        _BY_NAME[config_cls.method] = config_cls
        return handler_cls

    return wrap


def make_handler(config: PolicyConfig, info: ModelInfo) -> Policy:
    try:
        handler_cls = _HANDLERS[type(config)]
    except KeyError:
        raise ConfigError(f"{type(config).__name__} is not a registered stepcache policy.") from None
    return handler_cls(config, info)


def known_methods() -> list[str]:
    return sorted(_BY_NAME)


def policy_class(method: str) -> type:
    """The config class registered under ``method``."""
    try:
        return _BY_NAME[method]
    except KeyError:
        raise ConfigError(f"Unknown cache method {method!r}; known: {', '.join(sorted(_BY_NAME))}.") from None


@dataclass(frozen=True)
class NoCache(PolicyConfig):
    """Compute everything: the uncached baseline, with the same accounting as every policy."""

    method: ClassVar[str] = "none"


@register_policy(NoCache)
class NoCachePolicy(Policy):
    caches = False
