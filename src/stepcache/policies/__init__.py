"""The built-in caching methods, one file each; importing this package registers them all."""

from stepcache.policies import dbcache, fbcache, fora, forecast, l2c, magcache, taylorseer, teacache, toca  # noqa: F401
