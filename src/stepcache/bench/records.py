"""Benchmark records: environment capture, JSONL files keyed by a config hash, tables and plots.

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


def append_record(path: Path, record: dict) -> bool:
    """Append ``record`` unless one with the same key is already there; True if written."""
    from stepcache.io import atomic_write

    path = Path(path)
    if any(r.get("key") == record["key"] for r in read_records(path)):
        return False
    old = path.read_bytes() if path.is_file() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    # rewritten whole through a temporary file: a kill mid-append must not leave a half line that makes
    # every later read of the file fail
    atomic_write(path, lambda f: f.write(old + (json.dumps(record, sort_keys=True) + "\n").encode()))
    return True


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TABLE_COLUMNS = ("policy", "time s", "speedup", "ideal (MACs)", "PSNR dB", "SSIM", "class acc", "FD")


def table_row(r: dict) -> list[str]:
    q, t, w = r.get("quality", {}), r["time"], r["work"]
    return [r["label"], f"{t['median_s']:.2f}", f"{t['speedup']:.2f}x", f"{w['ideal_speedup']:.2f}x",
            _fmt(q.get("psnr"), ".1f"), _fmt(q.get("ssim"), ".3f"), _fmt(q.get("class_accuracy"), ".3f"),
            _fmt(q.get("frechet_distance"), ".2f")]


def markdown_table(records: list[dict]) -> str:
    """A markdown table of records (one row each) with the columns of :data:`TABLE_COLUMNS`."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(table_row(r)) + " |" for r in records]
    return "\n".join(lines) + "\n"


def pareto_front(records: list[dict], quality: str = "ssim") -> list[dict]:
    """Records not dominated in (measured speedup, ``quality``), both higher-is-better, by speedup."""
    pts = [r for r in records if r.get("quality", {}).get(quality) is not None]
    front = [r for r in pts if not any(
        o["time"]["speedup"] >= r["time"]["speedup"] and o["quality"][quality] >= r["quality"][quality]
        and (o["time"]["speedup"], o["quality"][quality]) != (r["time"]["speedup"], r["quality"][quality])
        for o in pts)]
    return sorted(front, key=lambda r: r["time"]["speedup"])


def pareto_plot(records: list[dict], path: Path, quality: str = "ssim", title: str = "") -> Path:
    """Scatter of measured speedup vs ``quality`` per method, with each method's Pareto front; a PNG."""
    from stepcache.errors import require

    matplotlib = require("matplotlib", "Plotting")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    methods = sorted({r["config"]["policy"]["method"] for r in records})
    for m in methods:
        rs = [r for r in records if r["config"]["policy"]["method"] == m and r["quality"].get(quality) is not None]
        ax.scatter([r["time"]["speedup"] for r in rs], [r["quality"][quality] for r in rs], label=m, alpha=0.7)
        front = pareto_front(rs, quality)
        ax.plot([r["time"]["speedup"] for r in front], [r["quality"][quality] for r in front], alpha=0.6)
    ax.set_xlabel("measured speedup (x)")
    ax.set_ylabel(quality)
    ax.set_title(title or f"speed vs {quality}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from stepcache.io import atomic_write

    try:
        atomic_write(Path(path), lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
    return Path(path)
