"""stepcache: training-free feature caching for diffusion transformers (FORA, ToCa, L2C)."""

from stepcache.errors import (CheckpointError, ClockError, ConfigError, ModelMismatchError, StepcacheError,
                              UnsupportedModelError)
from stepcache.models.dit import DiT
from stepcache.models.stdit3 import STDiT3
from stepcache.policies.base import NoCache, PolicyConfig
from stepcache.policies.fora import FORA
from stepcache.policies.l2c import L2C
from stepcache.policies.toca import ToCa
from stepcache.runtime.context import StepContext
from stepcache.runtime.handle import CacheHandle, apply
from stepcache.runtime.stats import CacheStats
from stepcache.sampling.sample import sample

__version__ = "0.1.0"

__all__ = [
    "DiT", "STDiT3", "sample", "apply", "CacheHandle", "CacheStats", "StepContext", "PolicyConfig", "NoCache", "FORA", "L2C",
    "ToCa", "StepcacheError", "ConfigError", "CheckpointError", "ModelMismatchError", "UnsupportedModelError",
    "ClockError", "__version__",
]
