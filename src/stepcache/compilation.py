"""Regional compilation under a cache: ``stepcache.compile_blocks(model)``.

``torch.compile(model)`` of a cached model works in either order (the hooks graph-break into plain
Python, at the same places on every call, so nothing recompiles), but the work inside the hooks, the
branch computations, then runs eagerly. ``compile_blocks`` compiles exactly that work, block by block
(one graph per kind of block, shared by all blocks of the class, as diffusers'
``compile_repeated_blocks`` does): the policy decides in Python, the branches run compiled.
"""

from __future__ import annotations

import torch

from stepcache.adapters import find_adapter
from stepcache.adapters.base import unwrap_compiled
from stepcache.api import get_handle
from stepcache.core.hooks import AttrPatch
from stepcache.errors import ConfigError

REGIONS_ATTR = "_stepcache_regions"


def compile_blocks(model, **options):
    """Compile the per-block tensor work of ``model`` (a model, a compiled model, or a pipeline) in place,
    before or after ``stepcache.apply``; ``options`` go to ``torch.compile`` (``backend``, ``mode``, ...).
    Returns ``model``. ``uncompile_blocks`` puts the eager functions back."""
    target, adapter = find_adapter(unwrap_compiled(model))
    if target.__dict__.get(REGIONS_ATTR):
        raise ConfigError(f"The blocks of this {type(target).__name__} are already compiled; call "
                          "stepcache.uncompile_blocks() first to compile them with other options.")
    regions = adapter.regions(target)
    patches: list = []

    def compile_regions():
        for obj, name in regions:
            patches.append(AttrPatch(obj, name, torch.compile(getattr(obj, name), **options)))

    _with_hooks_off(target, compile_regions)
    target.__dict__[REGIONS_ATTR] = patches
    return model


def uncompile_blocks(model) -> bool:
    """Undo :func:`compile_blocks` (False if the blocks were not compiled by it)."""
    target, _ = find_adapter(unwrap_compiled(model))
    patches = target.__dict__.pop(REGIONS_ATTR, None)
    if not patches:
        return False

    def restore():
        for patch in reversed(patches):
            patch.restore()

    _with_hooks_off(target, restore)
    return True


def _with_hooks_off(target, change) -> None:
    """Hooks wrap the forwards they found at ``apply``: swap the functions beneath them, then hook again."""
    handle = get_handle(target)
    if handle is None:
        change()
    else:
        handle.rehook(change)
