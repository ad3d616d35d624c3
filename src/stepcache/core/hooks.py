"""Removable patches of one instance's attributes (never the class): forwards, and other attributes."""

from __future__ import annotations

from typing import Callable

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
