"""The built-in caching methods, one file each; importing this package registers them all."""

from stepcache.policies import fora, l2c, toca  # noqa: F401
