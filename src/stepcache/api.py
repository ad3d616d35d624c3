"""The public verbs: ``apply``, ``remove``, ``summary``, ``get_handle``.

The only module that joins the adapters (where the sites are), the core (what runs) and the
diffusers clock (which step a pipeline is on).
"""

from __future__ import annotations

from stepcache.adapters import find_adapter
from stepcache.adapters.base import unwrap_compiled
from stepcache.core.engine import HANDLE_ATTR, CacheHandle
from stepcache.core.policy import PolicyConfig
from stepcache.errors import StepcacheError


def apply(model, policy: PolicyConfig) -> CacheHandle:
    """Install ``policy`` on ``model`` (a model, or a diffusers pipeline) in place; returns the handle
    (a context manager; ``remove()`` restores the original forwards bit for bit). A refused apply
    leaves the model exactly as it was."""
    if not isinstance(policy, PolicyConfig):
        raise StepcacheError(f"policy must be a stepcache policy config such as FORA(3), got {type(policy).__name__}.")
    model = unwrap_compiled(model)  # compile then apply: the hooks go on the module the wrapper calls
    target, adapter = find_adapter(model)
    handle = CacheHandle(target, adapter, policy).install()
    pipe = model if target is not model else None
    if pipe is None and hasattr(adapter, "timestep_scale"):  # a bare diffusers transformer: its pipeline, if any
        from stepcache.adapters.diffusers.clock import find_pipeline

        pipe = find_pipeline(target)  # else found at the first call, from the pipeline calling it
    if pipe is not None:  # a diffusers pipeline: its own loop publishes the clock
        from stepcache.adapters.diffusers.clock import attach_pipeline

        try:
            handle._patches.append(attach_pipeline(pipe, handle))
        except BaseException:
            handle.remove()
            raise
    return handle


def get_handle(model) -> CacheHandle | None:
    """The handle installed on ``model`` (or on a pipeline's transformer; either may be compiled), if any."""
    model = unwrap_compiled(model)
    handle = model.__dict__.get(HANDLE_ATTR) if hasattr(model, "__dict__") else None
    if handle is None and hasattr(model, "transformer"):
        handle = getattr(unwrap_compiled(model.transformer), "__dict__", {}).get(HANDLE_ATTR)
    return handle


def remove(model) -> bool:
    """Remove the policy installed on ``model`` (or its pipeline's transformer); False if there was none."""
    handle = get_handle(model)
    if handle is None:
        return False
    handle.remove()
    return True


def summary(model, details: bool = False) -> str:
    """The table of what the last run of ``model``'s installed policy did."""
    handle = get_handle(model)
    if handle is None:
        raise StepcacheError(f"{type(model).__name__} has no stepcache policy applied.")
    return handle.summary(details)
