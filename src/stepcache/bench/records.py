"""Benchmark records: environment capture, JSONL files keyed by a config hash, tables (plots: bench.figures).

Each record is one JSON line ``{"key", "config", "environment", "time", "work", "quality"}``. The key is
a hash of the config alone, so re-running a sweep with the same arguments appends nothing twice
(nanoGPT's ``bench.py`` and EDM's ``training_options.json`` keep config and environment beside results).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from stepcache.errors import ConfigError


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    """Where a number was measured: versions, threads, CPU / GPU model."""
    from stepcache._version import __version__

    env = {"stepcache": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def config_key(config: dict) -> str:
    """Stable 16-hex digest of a JSON-able config (sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_records(path: Path) -> list[dict]:
    """All records of a JSONL file (missing file: none); a corrupt line raises ConfigError."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a JSONL results file.")
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise ConfigError(f"{path} line {n} is not valid JSON.") from None
    return out


def append_record(path: Path, record: dict, replace: bool = False) -> bool:
    """Append ``record`` unless one with the same key is already there (``replace``: the old one is dropped and
    the new one appended); True if written."""
    from stepcache.io import atomic_write

    path = Path(path)
    old = read_records(path)
    if not replace and any(r.get("key") == record["key"] for r in old):
        return False
    kept = [r for r in old if r.get("key") != record["key"]]
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept + [record])
    # rewritten whole through a temporary file: a kill mid-append must not leave a half line that makes
    # every later read of the file fail
    atomic_write(path, lambda f: f.write(lines.encode()))
    return True


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TABLE_COLUMNS = ("policy", "time s", "speedup", "ideal (MACs)", "PSNR dB", "SSIM", "class acc", "FD")


NOISE_MARK = "*"
NOISE_NOTE = (f"{NOISE_MARK} measured speedup above the ideal (MACs) one: the caching cannot save more than the "
              "work it skips, so the excess is timing noise (a loaded machine, too few rounds).")


def above_ideal(r: dict) -> bool:
    """A measured speedup above the ideal one (beyond float rounding) can only be noise."""
    return r["time"]["speedup"] > r["work"]["ideal_speedup"] * (1 + 1e-9)


def table_row(r: dict) -> list[str]:
    q, t, w = r.get("quality", {}), r["time"], r["work"]
    mark = NOISE_MARK if above_ideal(r) else ""
    return [r["label"], f"{t['median_s']:.2f}", f"{t['speedup']:.2f}x{mark}", f"{w['ideal_speedup']:.2f}x",
            _fmt(q.get("psnr"), ".1f"), _fmt(q.get("ssim"), ".3f"), _fmt(q.get("class_accuracy"), ".3f"),
            _fmt(q.get("frechet_distance"), ".2f")]


def markdown_table(records: list[dict]) -> str:
    """A markdown table of records (one row each) with the columns of :data:`TABLE_COLUMNS`; a speedup above
    the ideal one is marked and explained under the table. The speedup is the median of per-round ratios."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(table_row(r)) + " |" for r in records]
    rounds = sorted({len(r["time"].get("runs_s", [])) for r in records} - {0})
    if rounds:
        lines += ["", f"speedup: median over {'/'.join(map(str, rounds))} interleaved round(s) of uncached time / "
                      "cached time, within each round."]
    if any(above_ideal(r) for r in records):
        lines += ["", NOISE_NOTE]
    return "\n".join(lines) + "\n"


def pareto_front(records: list[dict], quality: str = "ssim") -> list[dict]:
    """Records not dominated in (measured speedup, ``quality``), both higher-is-better, by speedup."""
    pts = [r for r in records if r.get("quality", {}).get(quality) is not None]
    front = [r for r in pts if not any(
        o["time"]["speedup"] >= r["time"]["speedup"] and o["quality"][quality] >= r["quality"][quality]
        and (o["time"]["speedup"], o["quality"][quality]) != (r["time"]["speedup"], r["quality"][quality])
        for o in pts)]
    return sorted(front, key=lambda r: r["time"]["speedup"])
