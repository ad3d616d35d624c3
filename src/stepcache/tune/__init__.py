"""``stepcache tune``: the best registered policy for a target speed or quality, checked on held-out seeds."""

from stepcache.tune.search import Target
from stepcache.tune.tuner import TuneOptions, tune

__all__ = ["Target", "TuneOptions", "tune"]
