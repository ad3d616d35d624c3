"""Per-run state, kept apart per model call of a step: the one owner of cond / uncond / k-th call state.

A pipeline may call the model more than once per step (true CFG: cond, then uncond); a policy's
cached outputs, histories and decision state must never mix between those calls. The runtime keeps
one :class:`CallState` per call index and switches to it before each model call (like diffusers'
``StateManager`` with ``cache_context``); everything is dropped at the start and end of every run.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class Slots(dict):
    """Named tensors a policy keeps for one site (its history, Taylor factors, a residual). A plain
    dict; the runtime counts the bytes of the tensors in it (also inside lists, tuples and dicts)."""


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class CallState:
    """What one model call of a step keeps across steps: the site outputs (``store``), the policy's
    slots per site (``memory``) and the policy's own state object (``policy``)."""

    def __init__(self, policy_state: Any):
        self.store: dict = {}  # SiteKey -> tensor (branch: un-gated output; span: residual)
        self.memory: dict = {}  # SiteKey -> Slots
        self.policy = policy_state

    def slots(self, site) -> Slots:
        slots = self.memory.get(site)
        if slots is None:
            slots = self.memory[site] = Slots()
        return slots

    def nbytes(self) -> int:
        return tensor_bytes(self.store) + tensor_bytes(self.memory)


class RunState:
    """The call states of one run, created on first use by ``make_policy_state``."""

    def __init__(self, make_policy_state: Callable[[], Any]):
        self._make = make_policy_state
        self.calls: dict[int, CallState] = {}

    def call(self, index: int) -> CallState:
        state = self.calls.get(index)
        if state is None:
            state = self.calls[index] = CallState(self._make())
        return state

    def clear(self) -> None:
        self.calls.clear()

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.calls.values())
