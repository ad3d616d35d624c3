"""Removable patches of one instance's attributes (never the class): forwards, and other attributes."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

_MISSING = object()


class AttrPatch:
    """Set an attribute on one instance; ``restore()`` puts back exactly what its ``__dict__`` held."""

    def __init__(self, obj, name: str, value):
        self.obj, self.name = obj, name
        self.previous = obj.__dict__.get(name, _MISSING)
        setattr(obj, name, value)

    def restore(self) -> None:
        if self.previous is _MISSING:
            self.obj.__dict__.pop(self.name, None)
        else:
            setattr(self.obj, self.name, self.previous)


class ForwardPatch:
    """Replace ``module.forward`` on this instance with ``make_forward(current forward)``.

    accelerate's hooks (``enable_model_cpu_offload``, ``cpu_offload``) keep the wrapped forward in
    ``module._old_forward`` and move it back to ``module.forward`` whenever they are removed, which
    diffusers does after every pipeline call (``maybe_free_model_hooks``) before it adds them again. A
    patch of ``forward`` made after those hooks would be dropped by the first such cycle, so on a module
    with accelerate's hook the wrapper goes into ``_old_forward``, where the cycle carries it along.
    ``restore()`` puts the original back wherever the wrapper is found then.
    """

    def __init__(self, module: nn.Module, make_forward: Callable[[Callable], Callable]):
        self.obj = module
        hooked = "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__
        self.name = "_old_forward" if hooked else "forward"
        self.previous = module.__dict__.get(self.name, _MISSING)
        self.original = getattr(module, self.name)  # bound method (or a previous instance patch)
        self.wrapper = make_forward(self.original)
        setattr(module, self.name, self.wrapper)

    def restore(self) -> None:
        held = self.obj.__dict__
        for name in ("forward", "_old_forward"):
            if held.get(name) is not self.wrapper:
                continue
            if name == "forward" and _is_class_forward(self.obj, self.original):
                held.pop("forward")
            else:
                setattr(self.obj, name, self.original)


def _is_class_forward(module: nn.Module, fn) -> bool:
    """Whether ``fn`` is just the class's own ``forward`` bound to ``module`` (no instance attribute needed)."""
    return getattr(fn, "__self__", None) is module and getattr(fn, "__func__", None) is type(module).forward


def eager(fn: Callable) -> Callable:
    """Run ``fn`` outside ``torch.compile``: a compiled model graph-breaks here and calls it as plain Python.

    The cache decisions read the step, mutate dicts and record statistics: traced, each step's Python ints
    would become guards and every step would recompile. Kept out, the break sits at the same place on every
    call, so the compiled pieces around it are built once and never recompiled. Tensor work called from
    ``fn`` runs eagerly unless it is compiled on its own (``stepcache.compile_blocks``). The disabled twin
    is made on the first traced call, so an eager-only program never imports dynamo (as long again as torch).
    """
    twin: list = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():  # being traced (a constant to dynamo): hand over to the twin
            return _outside(fn, twin)(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


def _outside(fn: Callable, twin: list) -> Callable:
    if not twin:
        twin.append(torch.compiler.disable(fn, reason="stepcache: cache decisions run eagerly, outside the graph"))
    return twin[0]
