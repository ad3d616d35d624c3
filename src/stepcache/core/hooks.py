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


class ForwardPatch(AttrPatch):
    """Replace ``module.forward`` on this instance with ``make_forward(current forward)``."""

    def __init__(self, module: nn.Module, make_forward: Callable[[Callable], Callable]):
        original = module.forward  # bound method (or a previous instance patch)
        super().__init__(module, "forward", make_forward(original))


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
