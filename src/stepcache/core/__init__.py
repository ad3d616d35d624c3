"""The caching contract: context, actions, policies and their registry, state, executor, stats.

Imports nothing above it (models, adapters, sampling and the CLI build on it)."""
