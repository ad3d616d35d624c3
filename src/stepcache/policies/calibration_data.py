"""Calibration data for the dynamic policies: published tables (package data) and calibration files.

A table entry is looked up by the adapter's model family (data, not behaviour: a policy never
branches on a family). A calibration file is the JSON written by ``stepcache calibrate``::

    {"format": "stepcache-calibration/1", "model": "...", "family": "...", "num_steps": 28,
     "mag_ratios": [...], "teacache_coefficients": [...]}
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from stepcache.errors import ConfigError

FORMAT = "stepcache-calibration/1"
ASSETS = Path(__file__).resolve().parent.parent / "assets"


@lru_cache(maxsize=None)
def _table(name: str) -> dict:
    return json.loads((ASSETS / name).read_text())["models"]


def published(table: str, key: str, family: str, names: tuple[str, ...] = ()) -> tuple[float, ...] | None:
    """The published values of ``key`` in the asset ``table`` for these weights (an entry whose ``names``
    include one of ``names``, e.g. the embedded model's), else for the model ``family``, else None."""
    entries = list(_table(table).values())
    for entry in entries:
        if set(names) & set(entry.get("names", ())):
            return tuple(float(v) for v in entry[key])
    for entry in entries:
        if family in entry.get("families", ()):
            return tuple(float(v) for v in entry[key])
    return None


def given_or_published(given, table: str, key: str, family: str, what: str, flag: str,
                       names: tuple[str, ...] = ()):
    """``given`` (a config's values), else the published values of ``key`` for these weights (``names``) or
    ``family``, else one sentence naming the fix (``what``: e.g. "MagCache has no magnitude ratios";
    ``flag``: how to pass a file)."""
    if given is not None:
        return given
    values = published(table, key, family, names)
    if values is None:
        raise ConfigError(f"{what} for {family}; run `stepcache calibrate --model ... --out FILE` and pass {flag}.")
    return values


def published_by_name(table: str, key: str, name: str) -> tuple[float, ...]:
    """The published values of ``key`` for the named model (e.g. "flux", "hunyuan-video")."""
    models = _table(table)
    if name not in models:
        raise ConfigError(f"No published {key} for {name!r}; known: {', '.join(sorted(models))} "
                          f"(or run `stepcache calibrate` for your model).")
    return tuple(float(v) for v in models[name][key])


def load_values(source, key: str, what: str) -> tuple[float, ...]:
    """A list of floats given inline, or read from the ``key`` field of a calibration file."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"Cannot read {what} from {str(path)!r} ({e.__class__.__name__}); "
                              f"run `stepcache calibrate` to write it.") from None
        if not isinstance(data, dict) or key not in data:
            raise ConfigError(f"{str(path)!r} has no {key!r}; run `stepcache calibrate` to write it.")
        source = data[key]
    try:
        values = tuple(float(v) for v in source)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a list of numbers or a calibration file path, got {source!r}.") from None
    if not values:
        raise ConfigError(f"{what} is empty; run `stepcache calibrate` to record it.")
    return values
