"""Cheap signals of a diffusers block for the policies: the first block's modulated input (TeaCache).

The modulated input is what the block's first attention reads: LN(x) * (1 + scale) + shift with the
CURRENT step's conditioning, computed again from the block's own call arguments and modules (the
same operations as the block, so the same bits). Declared per block class, like the sites.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F


def _ada_zero(block, call: inspect.BoundArguments):
    """FLUX double blocks, SD3 joint blocks: ``norm1(hidden, emb=temb)`` -> (modulated, gates...)."""
    h = call.arguments["hidden_states"]  # (B, T, D)
    out = block.norm1(h, emb=call.arguments["temb"])
    return out[0] if isinstance(out, tuple) else out


def _basic(block, call: inspect.BoundArguments):
    """``BasicTransformerBlock``: ada_norm_zero (DiT) or ada_norm_single (PixArt)."""
    h = call.arguments["hidden_states"]  # (B, T, D)
    timestep = call.arguments.get("timestep")
    if block.norm_type == "ada_norm_zero":
        return block.norm1(h, timestep, call.arguments.get("class_labels"), hidden_dtype=h.dtype)[0]
    if block.norm_type == "ada_norm_single":
        table = block.scale_shift_table[None] + timestep.reshape(h.shape[0], 6, -1)  # (B, 6, D)
        shift, scale = table.chunk(6, dim=1)[:2]  # (B, 1, D) each
        n = block.norm1
        normed = F.layer_norm(h, n.normalized_shape, n.weight, n.bias, n.eps)  # nn.LayerNorm's own arithmetic
        return (normed * (1 + scale) + shift).squeeze(1)
    return None


_BY_CLASS = {"FluxTransformerBlock": _ada_zero, "JointTransformerBlock": _ada_zero, "BasicTransformerBlock": _basic}
_MACS: dict = {}  # block class -> (block, call) -> MACs of one probe, where not the default adaLN projection


def register_modulated_input(block_class: str, probe, macs=None) -> None:
    """Declare the modulated-input probe of another block class (a family module's own adaLN arithmetic);
    ``macs(block, call)`` when recomputing it costs other than one 6 D x D projection per row."""
    _BY_CLASS[block_class] = probe
    if macs is not None:
        _MACS[block_class] = macs


def supports_modulated_input(block) -> bool:
    kind = _BY_CLASS.get(type(block).__name__)
    if kind is _basic:
        return getattr(block, "norm_type", None) in ("ada_norm_zero", "ada_norm_single")
    return kind is not None


def modulated_input(block, call: inspect.BoundArguments) -> tuple[torch.Tensor, int]:
    """(the block's modulated attention input (B, T, D), MACs per call of recomputing it)."""
    name = type(block).__name__
    m = _BY_CLASS[name](block, call)
    if name in _MACS:
        return m, _MACS[name](block, call)
    h = call.arguments["hidden_states"]
    D = h.shape[-1]
    macs = h.shape[0] * 6 * D * D  # the adaLN projection of the conditioning, per row
    return m, macs
