"""stepcache: training-free feature caching for diffusion transformers (FORA, ToCa, L2C, ...)."""

from stepcache.api import apply, get_handle, remove, summary
from stepcache.compilation import compile_blocks, uncompile_blocks
from stepcache.core.context import StepContext
from stepcache.core.engine import CacheHandle
from stepcache.core.policy import NoCache, PolicyConfig, known_methods
from stepcache.core.stats import CacheStats
from stepcache.errors import (CheckpointError, ClockError, ConfigError, ModelMismatchError, StepcacheError,
                              UnsupportedModelError)
from stepcache.models.dit import DiT
import stepcache.policies  # noqa: F401  (registers the built-in methods)
from stepcache.models.stdit3 import STDiT3
from stepcache.models.uvit import UViT
from stepcache.policies.dbcache import DBCache
from stepcache.policies.fbcache import FBCache
from stepcache.policies.fora import FORA
from stepcache.policies.forecast import Forecast
from stepcache.policies.l2c import L2C
from stepcache.policies.magcache import MagCache
from stepcache.policies.taylorseer import TaylorSeer
from stepcache.policies.teacache import TeaCache
from stepcache.policies.toca import ToCa
from stepcache.policy_file import load_policy
from stepcache.sampling.sample import sample

from stepcache._version import __version__  # noqa: E402

__all__ = [
    "DiT", "UViT", "STDiT3", "sample", "apply", "remove", "summary", "get_handle", "compile_blocks",
    "uncompile_blocks", "CacheHandle", "CacheStats",
    "StepContext", "PolicyConfig", "NoCache", "FORA", "L2C", "ToCa", "TaylorSeer", "FBCache", "MagCache", "TeaCache",
    "DBCache", "Forecast", "known_methods", "load_policy", "StepcacheError", "ConfigError",
    "CheckpointError", "ModelMismatchError", "UnsupportedModelError", "ClockError", "__version__",
]
