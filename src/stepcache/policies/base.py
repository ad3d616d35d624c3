"""Policies: a frozen config dataclass plus a handler class found through a registry.

A handler is pure decision logic with a little per-run state. The runtime asks it, for each
(step, layer, branch), what to do (:mod:`stepcache.runtime.actions`), and tells it what it saw
(for instance the attention map of a full step). The cached tensors themselves live in the
runtime's per-run store, never in the handler.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from stepcache.errors import ConfigError
from stepcache.runtime.actions import COMPUTE
from stepcache.runtime.context import RunInfo, StepContext

_HANDLERS: dict[type, type] = {}
_BY_NAME: dict[str, type] = {}


@dataclass(frozen=True)
class ModelInfo:
    """What a policy may know of the model, given by the adapter."""

    depth: int
    num_tokens: int
    grid: tuple[int, int]
    branches: tuple[str, ...]
    family: str = "dit"


@dataclass(frozen=True)
class PolicyConfig:
    """Base of every policy config. Subclasses are frozen dataclasses with a ``method`` name."""

    method: ClassVar[str] = "base"

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(d: dict) -> "PolicyConfig":
        d = dict(d)
        name = d.pop("method", None)
        if name not in _BY_NAME:
            raise ConfigError(f"Unknown cache method {name!r}; known: {', '.join(sorted(_BY_NAME))}.")
        return _BY_NAME[name](**d)


class PolicyHandler:
    """Decision logic of one policy for one model; ``reset`` is called at the start of every run."""

    caches: ClassVar[bool] = True  # False: nothing is ever reused, so the runtime stores nothing

    def __init__(self, config: PolicyConfig, info: ModelInfo):
        self.config = config
        self.info = info
        self.run: RunInfo | None = None

    def reset(self, run: RunInfo) -> None:
        self.run = run

    def decide(self, ctx: StepContext, layer: int, branch: str):
        return COMPUTE

    def observe(self, ctx: StepContext, layer: int, branch: str, attn_map=None, values=None, index=None) -> None:
        """Called after a full computation of (layer, branch); ``attn_map`` (B, T, T) or the value
        norms ``values`` (B, H, T) when the action asked for them. After a ``Partial(need_map=True)``,
        ``attn_map`` (B, k, L) holds the rows of the recomputed queries ``index`` (B, k)."""


def register_policy(config_cls: type):
    """Class decorator: ``@register_policy(FORA) class ForaHandler(PolicyHandler): ...``."""

    def wrap(handler_cls: type) -> type:
        _HANDLERS[config_cls] = handler_cls
        _BY_NAME[config_cls.method] = config_cls
        return handler_cls

    return wrap


def make_handler(config: PolicyConfig, info: ModelInfo) -> PolicyHandler:
    try:
        handler_cls = _HANDLERS[type(config)]
    except KeyError:
        raise ConfigError(f"{type(config).__name__} is not a registered stepcache policy.") from None
    return handler_cls(config, info)


def known_methods() -> list[str]:
    return sorted(_BY_NAME)


@dataclass(frozen=True)
class NoCache(PolicyConfig):
    """Compute everything: the uncached baseline, with the same accounting as every policy."""

    method: ClassVar[str] = "none"


@register_policy(NoCache)
class NoCacheHandler(PolicyHandler):
    caches = False
