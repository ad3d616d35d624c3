"""Adapters: where the cacheable sites are in one model family. Policies never see model classes."""

from __future__ import annotations

import sys

import torch

from stepcache.errors import UnsupportedModelError
from stepcache.core.context import ModelInfo

_ADAPTERS: list = []


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, T, D), index (B, k) -> (B, k, D): the rows of the tokens a partial step recomputes."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class Adapter:
    """Declares a model family: which classes it matches, its branches, and how to hook it."""

    family: str = "base"
    branches: tuple[str, ...] = ()

    def matches(self, model) -> bool:
        raise NotImplementedError

    def info(self, model) -> ModelInfo:
        raise NotImplementedError

    def regions(self, model) -> list[tuple[object, str]]:
        """(object, attribute) of the pure tensor functions that ``stepcache.compile_blocks`` compiles: the
        per-block work the hooks call (branch computations), none of the cache decisions."""
        raise UnsupportedModelError(f"stepcache.compile_blocks does not know the blocks of {self.family} models; "
                                    "compile their modules with torch.compile yourself.")

    def install(self, model, handle, patches: list) -> None:
        """Patch the model's forwards to route through ``handle``, appending each patch to ``patches``
        as soon as it is made (so a refusal half-way can be undone exactly)."""
        raise NotImplementedError


def register_adapter(adapter_cls: type) -> type:
    _ADAPTERS.append(adapter_cls())
    return adapter_cls


def supported_models() -> list[str]:
    return [a.family for a in _ADAPTERS]


def unwrap_compiled(model):
    """The module inside a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``), else ``model``: hooks go
    on the inner module, which the wrapper calls, so both orders of apply and compile run the same hooks."""
    frames = sys.modules.get("torch._dynamo.eval_frame")  # never loaded: nothing was compiled (and importing
    if frames is not None and isinstance(model, frames.OptimizedModule):  # dynamo costs as much as torch)
        return model._orig_mod
    return model


def find_adapter(obj):
    """(model, adapter) for a model or a pipeline holding one in ``.transformer`` (either maybe compiled)."""
    obj = unwrap_compiled(obj)
    candidates = [obj]
    if hasattr(obj, "transformer"):
        candidates.append(unwrap_compiled(obj.transformer))
    for model in candidates:
        for adapter in _ADAPTERS:
            if adapter.matches(model):
                return model, adapter
    raise UnsupportedModelError(
        f"stepcache has no adapter for {type(obj).__name__}; supported: {', '.join(supported_models())}.")
