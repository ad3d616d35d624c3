"""Model architectures (dit.py) and their loading (checkpoints.py registers the loaders DiT.from_pretrained uses)."""

from stepcache.models import checkpoints as _checkpoints  # noqa: F401  (registers the loaders)
