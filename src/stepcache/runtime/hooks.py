"""Removable forward hooks on an unmodified module (instance attribute, never the class)."""

from __future__ import annotations

from typing import Callable

from torch import nn

_MISSING = object()


class ForwardPatch:
    """Replace ``module.forward`` on this instance; ``restore()`` puts back exactly what was there."""

    def __init__(self, module: nn.Module, make_forward: Callable[[Callable], Callable]):
        self.module = module
        self.previous = module.__dict__.get("forward", _MISSING)
        original = module.forward  # bound method (or a previous instance patch)
        module.forward = make_forward(original)

    def restore(self) -> None:
        if self.previous is _MISSING:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.previous
