"""``stepcache demo``: the embedded digits DiT sampled with no cache, FORA, ToCa and L2C, same seeds.

Prints a table (wall time, measured speedup as the median of per-round ratios over interleaved rounds,
ideal speedup from MACs, PSNR / SSIM vs the uncached images, class accuracy, Fréchet distance) and writes
the sample grid (methods as rows, each with its |difference vs uncached| row) and a speed-quality plot
to ``out_dir``. Methods that this build or the shipped assets cannot run are skipped with the
reason printed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stepcache.bench.figures import pareto_plot, save_grids
from stepcache.bench.methods import build_policy
from stepcache.bench.records import above_ideal, markdown_table
from stepcache.bench.runner import RunSettings, interleaved, make_config, make_inputs, make_record, quality
from stepcache.bench.sweep import load_model, runnable_specs

# One representative setting per method (about 2-3x fewer MACs on the embedded model).
DEMO_SPECS = ("fora:interval=3", "toca:interval=3,fresh_ratio=0.1", "l2c", "taylorseer:interval=3,order=1",
              "forecast:num_full=15,scope=stack")  # the setting `stepcache tune` picks at 3x measured


def run_demo(out_dir: Path, settings: RunSettings, specs=DEMO_SPECS, log=print, progress: bool = True,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Sample every runnable method on the embedded model (on ``device``, in ``dtype``) in interleaved timing
    rounds with the uncached run; returns the records and written files."""
    settings.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_model("embedded", device, dtype)
    noise, labels = make_inputs(loaded.model, settings.num_samples, settings.seed)
    policies = [build_policy("none", settings.num_steps, settings.sampler)]
    policies += [build_policy(s, settings.num_steps, settings.sampler)
                 for s in runnable_specs(specs, settings, True, log)]
    log(f"sampling {settings.num_samples} digits with {len(policies)} policies, {settings.repeats} interleaved "
        "timing rounds")
    runs = interleaved(loaded.model, noise, labels, settings, policies, progress,
                       log=lambda line: log(f"  {line}"))
    (ref, _, base_times) = runs[0]
    records, named = [], []
    for k, (policy, (images, stats, times)) in enumerate(zip(policies, runs)):
        rec = make_record(make_config(loaded.model_id, settings, policy), policy, times, stats,
                          base_times if k else None, quality(images, labels, ref if k else None, judge=True))
        records.append(rec)
        mark = "*" if above_ideal(rec) else ""
        name = rec["label"] if k else "uncached"
        named.append((f"{name}\n{rec['time']['speedup']:.2f}x{mark} (ideal {rec['work']['ideal_speedup']:.2f}x), "
                      f"acc {rec['quality']['class_accuracy']:.2f}", images))
    files = {"grids": save_grids(named, out_dir / "demo_grids.png"),
             "plot": pareto_plot(records, out_dir / "demo_speed_quality.png", "ssim", "embedded digits DiT"),
             "table": out_dir / "demo_table.md", "records": out_dir / "demo_records.json"}
    files["table"].write_text(markdown_table(records))
    files["records"].write_text(json.dumps(records, indent=1))
    return {"records": records, "files": files}
