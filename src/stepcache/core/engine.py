"""The executor: runs each site as the policy decides, with exact accounting.

A :class:`CacheHandle` is a policy installed on a model (see :func:`stepcache.apply`). The sampler
(or the diffusers clock) calls ``begin_run`` once per sampling run and ``set_step`` before every
model call; the adapter's hooks call ``before_call``, ``block`` (spans) and ``branch`` (branches).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from stepcache.core.context import RunInfo, SiteKey, StepContext
from stepcache.core.hooks import eager
from stepcache.core.policy import PolicyConfig, make_handler
from stepcache.core.state import CallState, RunState, Slots, tensor_bytes
from stepcache.core.stats import CacheStats
from stepcache.errors import ClockError, ConfigError, StepcacheError

HANDLE_ATTR = "_stepcache_handle"


class SiteView:
    """What a policy may look at before it decides: the site's input, its cached output, its slots,
    and the adapter's probes (cheap signals such as block 0's modulated input)."""

    __slots__ = ("site", "input", "_call", "_probes", "_handle")

    def __init__(self, handle: "CacheHandle", site: SiteKey, x: torch.Tensor | None, probes: dict | None = None):
        self.site, self.input, self._handle = site, x, handle
        self._call: CallState = handle._call
        self._probes = probes or {}

    @property
    def cached(self) -> torch.Tensor | None:
        return self._call.store.get(self.site)

    @property
    def memory(self) -> Slots:
        return self._call.slots(self.site)

    def scratch(self, like: torch.Tensor, slot: str = "policy") -> torch.Tensor:
        """A reused work buffer shaped like ``like`` (contents undefined), for a policy's temporaries
        that die before ``decide`` returns (never return it or keep it: the next call overwrites it)."""
        return self._handle.scratch(like, slot)

    def probe(self, name: str) -> torch.Tensor:
        """An adapter-provided signal of this call (its work is counted as the policy's)."""
        fn = self._probes.get(name)
        if fn is None:
            raise ConfigError(f"This policy needs the model's {name!r}, which the {self._handle.info.family} "
                              "adapter does not provide at this site.")
        value, macs = fn()
        self._handle._stats.add_policy(macs)
        return value


@dataclass
class SiteResult:
    """What a site produced, shown to ``observe``."""

    output: torch.Tensor
    input: torch.Tensor | None = None
    attn_map: torch.Tensor | None = None
    values: torch.Tensor | None = None
    index: torch.Tensor | None = None
    memory: Slots | None = None


class CacheHandle:
    """A policy installed on a model. Use as a context manager or call ``remove()``."""

    def __init__(self, model, adapter, policy: PolicyConfig):
        self.model = model
        self.adapter = adapter
        self.policy = policy
        self.info = adapter.info(model)
        self.handler = make_handler(policy, self.info)
        self._spans = _check_spans(self.handler.spans(), self.info.depth)
        self.state = RunState(self.handler.new_call_state)
        self._call: CallState = self.state.call(0)
        self._stats = CacheStats(num_tokens=self.info.num_tokens)
        self.run: RunInfo | None = None
        self.ctx: StepContext | None = None
        self.clock = None
        self._patches = []
        self._removed = False
        self._uncached = False  # inside a model call that runs without the policy
        self._ahead: dict = {}  # actions decided ahead of their branch call (peek), this model call
        self._open: tuple | None = None  # (site, input) of the span being computed
        self._skip_to: int | None = None  # blocks below this index pass through (a reused span)
        self._skip_kind = "reuse"
        self._started: float | None = None
        self._scratch: dict = {}  # (slot, shape, dtype, device) -> a reused work buffer, freed with the run
        # Adapters may make reuse steps lean (skip work that only feeds reused branches, apply reused outputs
        # without temporaries; same bits on CPU). False runs the plain path: for A/B checks and benchmarks.
        # "fused": lean, and the gated adds of reused branches as one addcmul (one rounding: not the plain bits)
        self._lean: bool | str = True

    @property
    def lean(self) -> bool | str:
        """``True`` (default): lean reuse steps, bit-identical to the plain path; ``False``: the plain path;
        ``"fused"``: lean with ``x.addcmul_(gate, a)`` for reused branches: one memory pass fewer per gated
        add, one rounding instead of two (a few ulps from the plain path and the references)."""
        return self._lean

    @lean.setter
    def lean(self, value) -> None:
        if not (value is True or value is False or (isinstance(value, str) and value == "fused")):
            raise ConfigError(f"handle.lean must be True, False or 'fused', got {value!r}.")
        self._lean = value

    @property
    def has_spans(self) -> bool:
        """Whether the policy decides spans of blocks (adapters then route blocks through ``block``)."""
        return bool(self._spans)

    # ------------------------------------------------------------------ lifecycle
    def install(self) -> "CacheHandle":
        if getattr(self.model, HANDLE_ATTR, None) is not None:
            raise StepcacheError("This model already has a stepcache policy applied; call stepcache.remove() on it "
                                 "first.")
        patches: list = []
        try:
            self.adapter.install(self.model, self, patches)
        except BaseException:
            for patch in reversed(patches):  # a refused install leaves the model exactly as it was
                patch.restore()
            raise
        self._patches = patches
        self._hooks = len(patches)  # the adapter's own patches come first (a pipeline clock may follow)
        setattr(self.model, HANDLE_ATTR, self)
        return self

    def rehook(self, change: Callable[[], None]) -> None:
        """Take the adapter's hooks off, run ``change`` (e.g. put compiled forwards on the blocks' modules)
        and hook again: hooks keep the forward they wrapped, so they must wrap the changed one."""
        hooks, rest = self._patches[:self._hooks], self._patches[self._hooks:]
        for patch in reversed(hooks):
            patch.restore()
        self._patches = list(rest)
        change()
        patches: list = []
        try:
            self.adapter.install(self.model, self, patches)
        except BaseException:
            for patch in reversed(patches):
                patch.restore()
            raise
        self._patches, self._hooks = patches + self._patches, len(patches)

    def remove(self) -> None:
        """Restore the original forwards exactly and free every cached tensor."""
        if self._removed:
            return
        for patch in reversed(self._patches):
            patch.restore()
        self._patches = []
        if self.model.__dict__.get(HANDLE_ATTR) is self:
            delattr(self.model, HANDLE_ATTR)
        self.state.clear()
        self._scratch.clear()
        self._removed = True

    def __enter__(self) -> "CacheHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "installed"
        return f"<stepcache handle: {self.policy!r} on {self.info.family}, {state}>"

    def __deepcopy__(self, memo):
        raise StepcacheError("A model with a stepcache policy applied cannot be deep-copied (the copy would share "
                             "the original's hooks); call stepcache.remove() first, copy, then apply to each.")

    # ------------------------------------------------------------------ clock
    def begin_run(self, num_steps: int, batch: int, cfg: bool = False, uncond_first: bool = False,
                  stages: int = 1) -> None:
        """Start a sampling run: drop all state of the previous run."""
        self.run = RunInfo(num_steps=num_steps, batch=batch, cfg=cfg, uncond_first=uncond_first, stages=stages)
        self.state.clear()
        self._scratch.clear()
        self.ctx = None
        self._stats = CacheStats(num_tokens=self.info.num_tokens)
        self._started = time.perf_counter()
        self.handler.reset(self.run)

    def set_step(self, ctx: StepContext) -> None:
        if self.run is None:
            raise ClockError("set_step() called before begin_run(); a sampler must start the run first.")
        if ctx.num_steps != self.run.num_steps or not 0 <= ctx.i < ctx.num_steps \
                or not 0 <= ctx.stage < self.run.stages:
            raise ClockError(f"step {ctx.i} of {ctx.num_steps} does not belong to the current "
                             f"{self.run.num_steps}-step run.")
        self._stats.note_memory(self.state.nbytes())
        self.ctx = ctx

    def end_run(self) -> None:
        """Free the cached tensors; statistics stay readable until the next run."""
        self._stats.note_memory(self.state.nbytes())
        if self.run is not None and self._started is not None:
            self._stats.wall_s = time.perf_counter() - self._started  # host time (asynchronous GPU work aside)
            self._started = None
        self.state.clear()
        self._scratch.clear()
        self._call = self.state.call(0)
        self.ctx = None

    def stats(self) -> CacheStats:
        return self._stats

    def summary(self, details: bool = False) -> str:
        """A table of what the last run did (see :meth:`CacheStats.table`), headed by the resolved policy."""
        resolved = getattr(self.handler, "config", self.policy)
        return f"policy             {resolved!r}\n{self._stats.table(details)}"

    # ------------------------------------------------------------------ called by adapter hooks
    @eager
    def before_call(self, rows: int, fixed_macs: int) -> StepContext:
        if self.ctx is None:
            raise ClockError("The cached model was called outside a sampling run: use stepcache.sample(), a "
                             "supported pipeline, or handle.begin_run()/set_step() around your own loop.")
        if rows != self.run.batch:
            raise ClockError(f"The model was called with {rows} rows but the run was started for {self.run.batch}.")
        self._stats.nfe += 1
        self._stats.add_fixed(fixed_macs)
        self._ahead.clear()
        self._open = self._skip_to = None
        self._call = self.state.call(self.ctx.call)
        self.handler.state = self._call.policy
        return self.ctx

    @eager
    def peek(self, layer: int, name: str):
        """The action for (layer, branch) at this call, decided ahead of the branch call (adapters use it
        to skip work that only feeds a reused branch); the branch call then uses the same action. None
        where the handler must see the branch input first (``needs_input``) or outside a cached call."""
        if self._uncached or self.ctx is None or name in self.handler.needs_input:
            return None
        site = SiteKey(layer, name)
        if site not in self._ahead:
            self._ahead[site] = self.handler.decide(self.ctx, site, SiteView(self, site, None))
        return self._ahead[site]

    def holds(self, x: torch.Tensor) -> bool:
        """Whether the runtime keeps ``x`` for later in this call (the input of an open span, whose residual
        is taken against it): an adapter must not update such a tensor in place."""
        return self._open is not None and self._open[1] is x

    def scratch(self, like: torch.Tensor, slot: str = "adapter") -> torch.Tensor:
        """A work buffer shaped like ``like``, reused from call to call (contents undefined) so that hot
        elementwise temporaries allocate nothing: on CPU a fresh multi-MiB tensor costs page faults that
        can outweigh the arithmetic. Freed at the end of the run."""
        key = (slot, like.shape, like.dtype, like.device)
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
        return buf

    def skip_fixed(self, rows: int, macs: int) -> None:
        """Per-row fixed work counted for this block (``block(fixed=...)``) that the adapter did not do
        after all (the adaLN rows that only feed reused branches)."""
        self._stats.add_unspent(rows * macs)

    @contextlib.contextmanager
    def uncached(self, fixed_macs: int):
        """A model call that runs without the policy (e.g. SD3's skip-layer guidance call): every site
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

    # ------------------------------------------------------------------ spans (blocks as one unit)
    @eager
    def block(self, layer: int, x: torch.Tensor, run: Callable[[], Any], *, sites: tuple = (), fixed: int = 0,
              hidden: Callable[[Any], torch.Tensor] | None = None,
              passthrough: Callable[[torch.Tensor], Any] | None = None, probes: dict | None = None):
        """Run block ``layer`` (``run()`` gives its output) under the policy's spans.

        ``x`` (B, N, D) is the stream a span's residual applies to (two-stream blocks: [image; text]);
        ``hidden(out)`` extracts it from the block's output and ``passthrough(h)`` builds a block output
        from it (identity for single-stream blocks); ``sites`` ((name, macs(k)), ...) are the block's
        branches and ``fixed`` its per-call work outside them (adaLN), for the accounting of a skipped
        block. Without spans this is just ``run()`` plus ``fixed``.
        """
        hidden = hidden or _identity
        passthrough = passthrough or _identity
        rows = x.shape[0]
        if self._uncached or not self._spans:
            self._stats.add_fixed(rows * fixed)
            return run()
        if self._skip_to is not None:
            if layer < self._skip_to:  # inside a reused span: the start block already added its residual
                self._skipped(layer, rows, sites, fixed, self._skip_kind)
                return passthrough(x)
            self._skip_to = None
        end = self._spans.get(layer)
        if end is not None:
            site = SiteKey(layer, "span", end)
            action = self.handler.decide(self.ctx, site, SiteView(self, site, x, probes))
            if action.kind in ("reuse", "emit"):
                residual = self._cached(site) if action.kind == "reuse" else action.tensor
                if action.kind == "emit":
                    self._stats.add_policy(action.macs)
                self._moved(site, action.kind, residual)
                kind = "reuse" if action.kind == "reuse" else "forecast"
                self._skipped(layer, rows, sites, fixed, kind)
                self._skip_to, self._skip_kind = end, kind
                if end == layer + 1:
                    self._skip_to = None
                return passthrough(x + residual)
            if action.kind != "compute":
                raise StepcacheError(f"A span takes Compute, Reuse or Emit, not {action.kind!r}.")
            self._open = (site, x)
        self._stats.add_fixed(rows * fixed)
        out = run()
        if self._open is not None and self._open[0].end == layer + 1:
            site, x_in = self._open
            self._open = None
            residual = hidden(out) - x_in  # (B, N, D)
            self._stats.add_bytes(self.ctx.i, 2 * residual.nbytes, residual.nbytes)  # the residual itself
            if self.handler.caches:
                self._call.store[site] = residual
            self._observe(site, SiteResult(output=residual, input=x_in, memory=self._call.slots(site)))
        return out

    def _skipped(self, layer: int, rows: int, sites: tuple, fixed: int, kind: str = "reuse") -> None:
        T = self.info.num_tokens
        self._stats.add_skipped(rows * fixed)
        for name, macs in sites:
            self._stats.record(self.ctx.i, f"{layer}.{name}", 0, 0, rows * macs(T), kind)

    # ------------------------------------------------------------------ branches
    @eager
    def branch(self, layer: int, name: str, full: Callable, *, with_map: Callable | None = None,
               tokens: Callable | None = None, macs: Callable[[int], int],
               with_values: Callable | None = None, x: torch.Tensor | None = None,
               tokens_with_map: Callable | None = None) -> torch.Tensor:
        """Run one branch as the policy decides; returns its un-gated output (B, T, D).

        ``full()`` computes it; ``with_map()`` returns (output, attention map); ``with_values()``
        returns (output, per-head value norms); ``tokens(index)`` computes it on the tokens ``index``
        (B, k) only; ``tokens_with_map(index)`` also returns the attention map of those queries
        (B, k, L). ``macs(k)`` is the work for k tokens per row. ``x`` (B, T, D) is the branch input.
        """
        if self._uncached:
            out = full()
            self._stats.add_fixed(out.shape[0] * macs(self.info.num_tokens))
            return out
        ctx = self.ctx
        site = SiteKey(layer, name)
        action = self._ahead.pop(site, None)
        if action is None:
            action = self.handler.decide(ctx, site, SiteView(self, site, x))
        T = self.info.num_tokens
        kind = action.kind
        result = None
        if kind == "compute":
            if action.need_map:
                if with_map is None:
                    raise StepcacheError(f"branch {name!r} cannot produce an attention map for this policy.")
                out, attn_map = with_map()
                result = SiteResult(out, x, attn_map=attn_map)
            elif action.need_values:
                if with_values is None:
                    raise StepcacheError(f"branch {name!r} cannot produce value norms for this policy.")
                out, values = with_values()
                result = SiteResult(out, x, values=values)
            else:
                out = full()
                result = SiteResult(out, x)
            if self.handler.caches:
                self._call.store[site] = out
                self._moved(site, "store", out)
            k, label = T, "full"
        elif kind == "reuse":
            out, k, label = self._cached(site), 0, "reuse"
            self._moved(site, "reuse", out)
        elif kind == "emit":
            out, k, label = action.tensor, 0, "forecast"
            self._stats.add_policy(action.macs)
            self._moved(site, "emit", out)
        elif kind == "partial":
            if tokens is None:
                raise StepcacheError(f"branch {name!r} does not support token-wise recomputation.")
            out = self._cached(site) if action.base is None else action.base
            self._stats.add_policy(action.macs)
            index = action.index  # (B, k)
            k, label = index.shape[1], "partial"
            attn_map = None
            if k:
                if action.need_map:
                    if tokens_with_map is None:
                        raise StepcacheError(f"branch {name!r} cannot produce an attention map for this policy.")
                    fresh, attn_map = tokens_with_map(index)  # (B, k, D), (B, k, L)
                else:
                    fresh = tokens(index)  # (B, k, D)
                out.scatter_(1, index.unsqueeze(-1).expand(-1, -1, out.shape[-1]), fresh)
                self._stats.add_bytes(ctx.i, fresh.nbytes + index.nbytes, fresh.nbytes)  # the scatter
            self._moved(site, "reuse" if action.base is None else "emit", out)
            result = SiteResult(out, x, attn_map=attn_map, index=index)
        elif kind == "blend":
            fresh = full()
            out = action.weight * fresh + (1 - action.weight) * self._cached(site)
            self._moved(site, "reuse", out)
            k, label = T, "full"
        else:  # pragma: no cover - a policy bug
            raise StepcacheError(f"unknown action {action!r}")
        if result is not None:
            result.memory = self._call.slots(site)
            self._observe(site, result)
        rows = out.shape[0]
        self._stats.record(ctx.i, f"{layer}.{name}", k, rows * macs(k), rows * macs(T), label)
        return out

    def _observe(self, site: SiteKey, result: SiteResult) -> None:
        """``observe``, counting the bytes of a history update: when the policy's slots changed, every tensor
        they held before is read and every tensor new or updated in place (but the output) is written."""
        before = _fingerprint(result.memory)
        self.handler.observe(self.ctx, site, result)
        after = _fingerprint(result.memory)
        if after != before:
            written = sum(n for key, n in after.items() if key not in before and key[0] != id(result.output))
            self._stats.add_bytes(self.ctx.i, sum(before.values()), written)

    def _moved(self, site: SiteKey, how: str, out: torch.Tensor) -> None:
        """Bytes the executor moves for one site (the model in :class:`CacheStats`): a store writes the output
        into the cache, a reuse reads it back, a forecast reads the site's history and writes its output."""
        if how == "store":
            self._stats.add_bytes(self.ctx.i, 0, out.nbytes)
        elif how == "reuse":
            self._stats.add_bytes(self.ctx.i, out.nbytes, 0)
        else:  # emit
            self._stats.add_bytes(self.ctx.i, tensor_bytes(self._call.memory.get(site, {})), out.nbytes)

    def _cached(self, site: SiteKey) -> torch.Tensor:
        try:
            return self._call.store[site]
        except KeyError:
            raise ClockError(f"policy asked to reuse {site} at step {self.ctx.i} before it was ever computed in "
                             "this run.") from None


def _identity(x):
    return x


def _fingerprint(obj, out: dict | None = None) -> dict:
    """{(id, version): nbytes} of the tensors in a policy's slots (also inside lists, tuples and dicts):
    a tensor replaced or updated in place shows up as a new key."""
    out = {} if out is None else out
    if isinstance(obj, torch.Tensor):  # inference tensors keep no version: identity only
        out[(id(obj), None if obj.is_inference() else obj._version)] = obj.nbytes
    elif isinstance(obj, dict):
        for v in obj.values():
            _fingerprint(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _fingerprint(v, out)
    return out


def _check_spans(spans, depth: int) -> dict[int, int]:
    """{start: end} of a policy's spans, validated: inside the model, non-empty, non-overlapping."""
    table: dict[int, int] = {}
    last = 0
    for start, end in sorted((int(s), int(e)) for s, e in spans):
        if not 0 <= start < end <= depth:
            raise ConfigError(f"A span of blocks {start}..{end - 1} does not fit a {depth}-block model.")
        if start < last:
            raise ConfigError(f"Spans of blocks overlap at block {start}.")
        table[start] = end
        last = end
    return table
