"""Typed exceptions. Every error a user can cause is one of these, with one clear sentence."""

from __future__ import annotations


class StepcacheError(Exception):
    """Base class of every error stepcache raises on purpose."""


class ConfigError(StepcacheError, ValueError):
    """An impossible or unknown setting (bad interval, ratio, schedule, model name...)."""


class CheckpointError(StepcacheError):
    """A checkpoint or router file is missing, corrupt, or cannot be fetched."""


class ModelMismatchError(StepcacheError):
    """A file or policy was made for another model (depth, step count, sampler...)."""


class UnsupportedModelError(StepcacheError, TypeError):
    """No adapter knows this model class."""


class ClockError(StepcacheError, RuntimeError):
    """A cached model was called without a step context from a sampler."""


class MissingDependencyError(StepcacheError, ImportError):
    """A feature needs a package of an optional extra (``[eval]``, ``[bench]``) that is not installed."""


# import name -> (pip name, the extra that installs it)
OPTIONAL = {"scipy": ("scipy", "eval"), "sklearn": ("scikit-learn", "eval"), "matplotlib": ("matplotlib", "bench"),
            "imageio": ("imageio", "video"), "imageio_ffmpeg": ("imageio-ffmpeg", "video")}


def require(module: str, purpose: str):
    """``module`` imported, or one sentence naming the extra to install.

    The core install (torch, numpy, safetensors, tqdm, pillow) samples and caches; metrics, the digits data
    and plots import their packages through here, when they are used, never at ``import stepcache``.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package, extra = OPTIONAL.get(module.split(".")[0], (module.split(".")[0], "dev"))
        raise MissingDependencyError(f"{purpose} needs {package}, which is not installed; install it with "
                                     f"pip install 'stepcache[{extra}]'.") from None
