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
