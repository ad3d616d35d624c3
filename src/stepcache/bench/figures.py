"""Figures of ``bench`` and ``demo``: the speed-quality (Pareto) plot and the sample grid.

Why these shapes: a reader compares methods setting by setting, so every point carries its setting and a
tick at the speedup its MACs promise (the gap between the two is what the machine lost, and a point to the
right of its tick is timing noise); methods are rows of the sample grid, each followed by its
|difference vs uncached| row, so that where a method drifts is visible at a glance, digits enlarged by
nearest-neighbour upsampling (no blur). The figure builders return matplotlib figures (tests inspect them);
the ``*_plot`` / ``save_*`` functions write PNGs atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stepcache.bench.records import above_ideal, pareto_front

GRID_COLUMNS = 10   # digits per row (one of each class with the demo's labels k mod 10)
GRID_SCALE = 4      # nearest-neighbour upsampling of each digit
GRID_GAP = 2        # pixels between digits (before nothing: gaps are not scaled)


def _pyplot():
    from stepcache.errors import require

    matplotlib = require("matplotlib", "Plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    from stepcache.io import atomic_write

    plt = _pyplot()
    try:
        atomic_write(Path(path), lambda f: fig.savefig(f, format="png", bbox_inches="tight"))
    finally:
        plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------------- Pareto plot
def setting_text(r: dict) -> str:
    """The point label: the policy's settings without the method name (``fora(interval=3)`` -> ``interval=3``)."""
    label = r["label"]
    inner = label.partition("(")[2].rstrip(")")
    return (inner or label) + ("*" if above_ideal(r) else "")


def pareto_figure(records: list[dict], quality: str = "ssim", title: str = ""):
    """Measured speedup vs ``quality``, one colour per method, every point labelled with its setting, a tick
    at its ideal (MACs) speedup joined by a dotted line, and each method's Pareto front."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    methods = sorted({r["config"]["policy"]["method"] for r in records})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(methods):
        rs = [r for r in records if r["config"]["policy"]["method"] == m and r["quality"].get(quality) is not None]
        if not rs:  # the uncached baseline has no quality vs itself: no empty legend entry
            continue
        c = colours[i % len(colours)]
        xs, ys = [r["time"]["speedup"] for r in rs], [r["quality"][quality] for r in rs]
        ideal = [r["work"]["ideal_speedup"] for r in rs]
        ax.scatter(xs, ys, color=c, label=m, zorder=3)
        ax.scatter(ideal, ys, color=c, marker="|", s=160, zorder=2)
        for x, y, xi, r in zip(xs, ys, ideal, rs):
            ax.plot([x, xi], [y, y], color=c, linestyle=":", linewidth=1, zorder=1)
            ax.annotate(setting_text(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=c)
        front = pareto_front(rs, quality)
        if len(front) > 1:
            ax.plot([r["time"]["speedup"] for r in front], [r["quality"][quality] for r in front], color=c,
                    alpha=0.5, zorder=1)
    if ax.collections:  # one legend entry for the ideal ticks, in neutral grey
        ax.scatter([], [], color="grey", marker="|", s=160, label="ideal speedup (MACs)")
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("measured speedup (x); | = ideal from MACs; * = above ideal (timing noise)")
    ax.set_ylabel(quality)
    ax.set_title(title or f"speed vs {quality}")
    ax.grid(alpha=0.3)
    return fig


def pareto_plot(records: list[dict], path: Path, quality: str = "ssim", title: str = "") -> Path:
    """:func:`pareto_figure` written to ``path`` (PNG)."""
    return _save(pareto_figure(records, quality, title), path)


# ---------------------------------------------------------------------------------------------- sample grid
def _upsample(img: np.ndarray, scale: int) -> np.ndarray:
    """(H, W, ...) -> (H*scale, W*scale, ...), nearest neighbour."""
    return img.repeat(scale, axis=0).repeat(scale, axis=1)


def grid_rows(named_images: list[tuple[str, torch.Tensor]],
              columns: int = GRID_COLUMNS) -> list[tuple[str, np.ndarray]]:
    """(label, RGB row (H, columns*W, 3) in [0, 1]) per row: the first entry (uncached) alone, then each method
    and its |difference vs uncached| (one colour scale for all methods: the largest difference is yellow)."""
    from matplotlib import colormaps

    def strip(images: torch.Tensor) -> np.ndarray:                              # (N, 1, H, W) -> (H, n*W)
        pix = ((images[:columns, 0].float().clamp(-1, 1) + 1) / 2).numpy()      # (n, H, W) in [0, 1]
        return np.concatenate(list(pix), axis=1)

    (ref_name, ref), rest = named_images[0], named_images[1:]
    base = strip(ref)
    diffs = [np.abs(strip(images) - base) for _, images in rest]
    top = max([float(d.max()) for d in diffs] + [1e-6])
    rows = [(ref_name, np.repeat(base[..., None], 3, axis=2))]
    for (name, images), diff in zip(rest, diffs):
        rows.append((name, np.repeat(strip(images)[..., None], 3, axis=2)))
        rows.append((f"|{name.splitlines()[0]} - uncached|", colormaps["magma"](diff / top)[..., :3]))
    return rows


def grid_array(rows: list[tuple[str, np.ndarray]], digit: int, scale: int = GRID_SCALE,
               gap: int = GRID_GAP) -> np.ndarray:
    """The rows stacked into one RGB image: each digit ``digit`` px upsampled ``scale`` times, ``gap`` px of white
    between digits and rows: shape (rows*(digit*scale+gap)+gap, columns*(digit*scale+gap)+gap, 3)."""
    cols = rows[0][1].shape[1] // digit
    cell = digit * scale + gap
    out = np.ones((len(rows) * cell + gap, cols * cell + gap, 3))
    for r, (_, row) in enumerate(rows):
        for c in range(cols):
            tile = _upsample(row[:, c * digit:(c + 1) * digit], scale)
            out[gap + r * cell:gap + r * cell + digit * scale, gap + c * cell:gap + c * cell + digit * scale] = tile
    return out


def grid_figure(named_images: list[tuple[str, torch.Tensor]], columns: int = GRID_COLUMNS, scale: int = GRID_SCALE):
    """Methods as rows (uncached first), each followed by its |difference| row; labels on the left."""
    plt = _pyplot()
    digit = named_images[0][1].shape[-1]
    rows = grid_rows(named_images, columns)
    image = grid_array(rows, digit, scale)
    dpi = 100
    fig = plt.figure(figsize=(image.shape[1] / dpi + 2.6, image.shape[0] / dpi + 0.2), dpi=dpi)
    ax = fig.add_axes((2.6 / (image.shape[1] / dpi + 2.6), 0.0, image.shape[1] / dpi / (image.shape[1] / dpi + 2.6),
                       1.0))
    ax.imshow(image, interpolation="nearest")
    cell = digit * scale + GRID_GAP
    ax.set_yticks([GRID_GAP + r * cell + digit * scale / 2 for r in range(len(rows))], [name for name, _ in rows],
                  fontsize=9)
    ax.set_xticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    ax.tick_params(left=False)
    return fig


def save_grids(named_images: list[tuple[str, torch.Tensor]], path: Path) -> Path:
    """:func:`grid_figure` written to ``path`` (PNG)."""
    return _save(grid_figure(named_images), path)
