"""Model adapters; importing this package registers the built-in ones."""

from stepcache.adapters.base import Adapter, find_adapter, register_adapter, supported_models
from stepcache.adapters import dit as _dit  # noqa: F401  (registers DiTAdapter)

__all__ = ["Adapter", "find_adapter", "register_adapter", "supported_models"]
