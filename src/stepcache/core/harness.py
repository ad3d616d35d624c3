"""Drive a policy by hand, without a model: for unit tests of a policy's decisions and for writing one.

``PolicyDriver(ToCa(...), info)`` keeps the per-call states the runtime would keep and passes views
and results of the given tensors, so ``driver.decide(ctx, layer, "mlp", x=...)`` is what the runtime
would ask at that site.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from stepcache.core.context import ModelInfo, RunInfo, SiteKey, StepContext
from stepcache.core.engine import SiteResult
from stepcache.core.policy import Policy, PolicyConfig, make_handler
from stepcache.core.state import RunState


class PolicyDriver:
    def __init__(self, policy: PolicyConfig | Policy, info: ModelInfo):
        self.handler = policy if isinstance(policy, Policy) else make_handler(policy, info)
        self.states = RunState(self.handler.new_call_state)

    def reset(self, run: RunInfo) -> None:
        self.states.clear()
        self.handler.reset(run)

    def call_state(self, call: int = 0):
        """The policy's state object of model call ``call``."""
        return self.states.call(call).policy

    def _enter(self, ctx: StepContext, site: SiteKey):
        state = self.states.call(ctx.call)
        self.handler.state = state.policy
        return state

    def decide(self, ctx: StepContext, layer: int, name: str, *, x: torch.Tensor | None = None,
               cached: torch.Tensor | None = None, end: int | None = None):
        site = SiteKey(layer, name, end)
        state = self._enter(ctx, site)
        view = SimpleNamespace(site=site, input=x, cached=cached if cached is not None else state.store.get(site),
                               memory=state.slots(site))
        return self.handler.decide(ctx, site, view)

    def observe(self, ctx: StepContext, layer: int, name: str, output: torch.Tensor | None = None, *,
                end: int | None = None, **fields) -> None:
        site = SiteKey(layer, name, end)
        state = self._enter(ctx, site)
        if output is not None:
            state.store[site] = output
        self.handler.observe(ctx, site, SiteResult(output=output, memory=state.slots(site), **fields))
