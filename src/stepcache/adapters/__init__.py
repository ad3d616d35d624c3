"""Model adapters; importing this package registers the built-in ones."""

from stepcache.adapters.base import Adapter, find_adapter, register_adapter, supported_models
from stepcache.adapters import dit as _dit  # noqa: F401  (registers DiTAdapter)
from stepcache.adapters import stdit3 as _stdit3  # noqa: F401  (registers STDiT3Adapter)
from stepcache.adapters import uvit as _uvit  # noqa: F401  (registers UViTAdapter)
from stepcache.adapters.diffusers.common import diffusers_available

if diffusers_available():  # diffusers itself is imported lazily: matching is by class name and module
    from stepcache.adapters.diffusers import cogvideox, dit, flux, ltx, pixart, sd3, wan  # noqa: F401

__all__ = ["Adapter", "find_adapter", "register_adapter", "supported_models"]
