"""``stepcache demo``: the embedded digits DiT sampled with no cache, FORA, ToCa and L2C, same seeds.

Prints a table (wall time, measured speedup, ideal speedup from MACs, PSNR / SSIM vs the uncached
images, class accuracy, Fréchet distance) and writes the image grids side by side and a speed-quality
plot to ``out_dir``. Methods that this build or the shipped assets cannot run are skipped with the
reason printed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from stepcache.bench.methods import build_policy
from stepcache.bench.records import markdown_table, pareto_plot
from stepcache.bench.runner import RunSettings, make_config, make_inputs, make_record, quality, timed
from stepcache.bench.sweep import load_model, runnable_specs

# One representative setting per method (about 2-3x fewer MACs on the embedded model).
DEMO_SPECS = ("fora:interval=3", "toca:interval=3,fresh_ratio=0.1", "l2c", "taylorseer:interval=3,order=1",
              "forecast:num_full=15")


def image_grid(images: torch.Tensor, columns: int = 10) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> one grey grid (rows*H + gaps, columns*W + gaps) in [0, 1]."""
    n, _, H, W = images.shape
    columns = min(columns, n)
    rows = (n + columns - 1) // columns
    grid = np.ones((rows * (H + 1) + 1, columns * (W + 1) + 1))
    pix = ((images[:, 0].clamp(-1, 1) + 1) / 2).numpy()  # (N, H, W)
    for k in range(n):
        r, c = divmod(k, columns)
        grid[1 + r * (H + 1):1 + r * (H + 1) + H, 1 + c * (W + 1):1 + c * (W + 1) + W] = pix[k]
    return grid


def save_grids(named_images: list[tuple[str, torch.Tensor]], path: Path) -> Path:
    """The methods' grids side by side with their labels; a PNG."""
    from stepcache.errors import require

    matplotlib = require("matplotlib", "Plotting")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(named_images), figsize=(3.2 * len(named_images), 3.4), dpi=120, squeeze=False)
    for ax, (name, images) in zip(axes[0], named_images):
        ax.imshow(image_grid(images), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_demo(out_dir: Path, settings: RunSettings, specs=DEMO_SPECS, log=print, progress: bool = True,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Sample every runnable method on the embedded model (on ``device``, in ``dtype``); returns the records
    and written files."""
    settings.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_model("embedded", device, dtype)
    noise, labels = make_inputs(loaded.model, settings.num_samples, settings.seed)
    policies = [build_policy("none", settings.num_steps, settings.sampler)]
    policies += [build_policy(s, settings.num_steps, settings.sampler)
                 for s in runnable_specs(specs, settings, True, log)]
    records, named, ref, base_time = [], [], None, None
    for k, policy in enumerate(policies):
        log(f"[{k + 1}/{len(policies)}] sampling {settings.num_samples} digits with {policy!r}")
        images, stats, times = timed(loaded.model, noise, labels, settings, policy, progress)
        rec = make_record(make_config(loaded.model_id, settings, policy), policy, times, stats, base_time,
                          quality(images, labels, ref, judge=True))
        if ref is None:
            ref, base_time = images, rec["time"]["median_s"]
            rec["time"]["speedup"] = 1.0
        records.append(rec)
        named.append((f"{rec['label']}\n{rec['time']['speedup']:.2f}x, acc {rec['quality']['class_accuracy']:.2f}",
                      images))
    files = {"grids": save_grids(named, out_dir / "demo_grids.png"),
             "plot": pareto_plot(records, out_dir / "demo_speed_quality.png", "ssim", "embedded digits DiT"),
             "table": out_dir / "demo_table.md", "records": out_dir / "demo_records.json"}
    files["table"].write_text(markdown_table(records))
    files["records"].write_text(json.dumps(records, indent=1))
    return {"records": records, "files": files}
