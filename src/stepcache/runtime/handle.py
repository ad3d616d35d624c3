"""``stepcache.apply(model, policy)``: install a policy on an unmodified model, reversibly."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from stepcache.errors import ClockError, StepcacheError
from stepcache.policies.base import PolicyConfig, make_handler
from stepcache.runtime.context import RunInfo, StepContext
from stepcache.runtime.stats import CacheStats

_ATTR = "_stepcache_handle"


class CacheHandle:
    """A policy installed on a model. Use as a context manager or call ``remove()``.

    The sampler (or the diffusers bridge) calls ``begin_run`` once per sampling run and
    ``set_step`` before every step; the adapter's hooks call ``before_call`` and ``branch``.
    """

    def __init__(self, model, adapter, policy: PolicyConfig):
        self.model = model
        self.adapter = adapter
        self.policy = policy
        self.info = adapter.info(model)
        self.handler = make_handler(policy, self.info)
        self.store: dict = {}
        self._stats = CacheStats(num_tokens=self.info.num_tokens)
        self.run: RunInfo | None = None
        self.ctx: StepContext | None = None
        self._patches = []
        self._removed = False
        self._uncached = False  # inside a model call that runs without the policy
        self._ahead: dict = {}  # actions decided ahead of their branch call (peek), this model call

    # ------------------------------------------------------------------ lifecycle
    def install(self) -> "CacheHandle":
        if getattr(self.model, _ATTR, None) is not None:
            raise StepcacheError("This model already has a stepcache policy applied; call remove() on it first.")
        self._patches = self.adapter.install(self.model, self)
        setattr(self.model, _ATTR, self)
        return self

    def remove(self) -> None:
        """Restore the original forwards exactly and free every cached tensor."""
        if self._removed:
            return
        for patch in reversed(self._patches):
            patch.restore()
        self._patches = []
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)
        self.store.clear()
        self._removed = True

    def __enter__(self) -> "CacheHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ------------------------------------------------------------------ clock
    def begin_run(self, num_steps: int, batch: int, cfg: bool = False, stages: int = 1) -> None:
        """Start a sampling run: drop all state of the previous run."""
        self.run = RunInfo(num_steps=num_steps, batch=batch, cfg=cfg, stages=stages)
        self.store.clear()
        self.ctx = None
        self._stats = CacheStats(num_tokens=self.info.num_tokens)
        self.handler.reset(self.run)

    def set_step(self, ctx: StepContext) -> None:
        if self.run is None:
            raise ClockError("set_step() called before begin_run(); a sampler must start the run first.")
        if ctx.num_steps != self.run.num_steps or not 0 <= ctx.i < ctx.num_steps \
                or not 0 <= ctx.stage < self.run.stages:
            raise ClockError(f"step {ctx.i} of {ctx.num_steps} does not belong to the current "
                             f"{self.run.num_steps}-step run.")
        self.ctx = ctx

    def end_run(self) -> None:
        """Free the cached tensors; statistics stay readable until the next run."""
        self.store.clear()
        self.ctx = None

    def stats(self) -> CacheStats:
        return self._stats

    # ------------------------------------------------------------------ called by adapter hooks
    def before_call(self, rows: int, fixed_macs: int) -> StepContext:
        if self.ctx is None:
            raise ClockError("The cached model was called outside a sampling run: use stepcache.sample(), a "
                             "supported pipeline, or handle.begin_run()/set_step() around your own loop.")
        if rows != self.run.batch:
            raise ClockError(f"The model was called with {rows} rows but the run was started for {self.run.batch}.")
        self._stats.nfe += 1
        self._stats.add_fixed(fixed_macs)
        self._ahead.clear()
        return self.ctx

    def peek(self, layer: int, name: str):
        """The action for (layer, branch) at this call, decided ahead of the branch call (adapters use it
        to skip work that only feeds a reused branch); the branch call then uses the same action. None
        where the handler must see the branch input before it decides (``needs_tokens``, for the
        branches in its ``token_branches``: ToCa's mlp and cross), or outside a cached call."""
        handler = self.handler
        if self._uncached or self.ctx is None or (
                getattr(handler, "needs_tokens", False) and name in getattr(handler, "token_branches", (name,))):
            return None
        key = (layer, name)
        if key not in self._ahead:
            self._ahead[key] = handler.decide(self.ctx, layer, name)
        return self._ahead[key]

    @contextlib.contextmanager
    def uncached(self, fixed_macs: int):
        """A model call that runs without the policy (e.g. SD3's skip-layer guidance call): every branch
        computes, no cache is read or written, the work counts as executed and uncached alike."""
        if self.ctx is None:
            raise ClockError("The cached model was called outside a sampling run.")
        self._stats.nfe += 1
        self._stats.add_fixed(fixed_macs)
        self._uncached = True
        try:
            yield
        finally:
            self._uncached = False

    def branch(self, layer: int, name: str, full: Callable, *, with_map: Callable | None = None,
               tokens: Callable | None = None, macs: Callable[[int], int],
               with_values: Callable | None = None, x: torch.Tensor | None = None,
               tokens_with_map: Callable | None = None) -> torch.Tensor:
        """Run one branch as the policy decides; returns its un-gated output (B, T, D).

        ``full()`` computes it; ``with_map()`` returns (output, attention map); ``with_values()``
        returns (output, per-head value norms); ``tokens(index)`` computes it on the tokens ``index``
        (B, k) only; ``tokens_with_map(index)`` also returns the attention map of those queries
        (B, k, L), handed to the handler with ``index``. ``macs(k)`` is the work for k tokens per row.
        ``x`` (B, T, D), the branch input, is shown to handlers that score tokens from it
        (``needs_tokens``) before they decide.
        """
        ctx = self.ctx
        if self._uncached:
            out = full()
            self._stats.add_fixed(out.shape[0] * macs(self.info.num_tokens))
            return out
        key = (layer, name)
        if x is not None and getattr(self.handler, "needs_tokens", False):
            self.handler.see_tokens(ctx, layer, name, x, self.store.get(key))
        action = self._ahead.pop(key, None)
        if action is None:
            action = self.handler.decide(ctx, layer, name)
        T = self.info.num_tokens
        if action.kind == "compute":
            if action.need_map:
                if with_map is None:
                    raise StepcacheError(f"branch {name!r} cannot produce an attention map for this policy.")
                out, attn_map = with_map()
                self.handler.observe(ctx, layer, name, attn_map=attn_map)
            elif action.need_values:
                if with_values is None:
                    raise StepcacheError(f"branch {name!r} cannot produce value norms for this policy.")
                out, values = with_values()
                self.handler.observe(ctx, layer, name, values=values)
            else:
                out = full()
                self.handler.observe(ctx, layer, name)
            if self.handler.caches:
                self.store[key] = out
            k = T
        elif action.kind == "reuse":
            out = self._cached(key, ctx)
            k = 0
        elif action.kind == "partial":
            if tokens is None:
                raise StepcacheError(f"branch {name!r} does not support token-wise recomputation.")
            out = self._cached(key, ctx)
            index = action.index  # (B, k)
            k = index.shape[1]
            if k:
                if action.need_map:
                    if tokens_with_map is None:
                        raise StepcacheError(f"branch {name!r} cannot produce an attention map for this policy.")
                    fresh, attn_map = tokens_with_map(index)  # (B, k, D), (B, k, L)
                    self.handler.observe(ctx, layer, name, attn_map=attn_map, index=index)
                else:
                    fresh = tokens(index)  # (B, k, D)
                out.scatter_(1, index.unsqueeze(-1).expand(-1, -1, out.shape[-1]), fresh)
        elif action.kind == "blend":
            fresh = full()
            out = action.weight * fresh + (1 - action.weight) * self._cached(key, ctx)
            k = T
        else:  # pragma: no cover - a policy bug
            raise StepcacheError(f"unknown action {action!r}")
        rows = out.shape[0]
        self._stats.record(ctx.i, f"{layer}.{name}", k, rows * macs(k), rows * macs(T))
        return out

    def _cached(self, key, ctx: StepContext) -> torch.Tensor:
        try:
            return self.store[key]
        except KeyError:
            raise ClockError(f"policy asked to reuse {key[0]}.{key[1]} at step {ctx.i} before it was ever "
                             "computed in this run.") from None


def get_handle(model) -> CacheHandle | None:
    """The handle installed on ``model`` (or on a pipeline's transformer), if any."""
    handle = getattr(model, _ATTR, None)
    if handle is None and hasattr(model, "transformer"):
        handle = getattr(model.transformer, _ATTR, None)
    return handle


def apply(model, policy: PolicyConfig) -> CacheHandle:
    """Install ``policy`` on ``model`` in place; returns the handle (context manager, ``remove()``)."""
    from stepcache.adapters import find_adapter

    if not isinstance(policy, PolicyConfig):
        raise StepcacheError(f"policy must be a stepcache policy config such as FORA(3), got {type(policy).__name__}.")
    target, adapter = find_adapter(model)
    handle = CacheHandle(target, adapter, policy).install()
    if target is not model:  # a diffusers pipeline: its own loop publishes the clock
        from stepcache.sampling.diffusers_bridge import attach_pipeline

        try:
            handle._patches.append(attach_pipeline(model, handle))
        except Exception:
            handle.remove()
            raise
    return handle
