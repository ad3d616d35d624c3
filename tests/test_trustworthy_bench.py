"""Issue 16, "the demo and bench must be trustworthy": interleaved rounds and the median of per-round ratios,
speedups above the ideal flagged as noise, ``bench --force``, ``--out`` under the output folder, and the
structure of the figures (labelled points, ideal ticks, no empty legend entries, rows x columns grid,
integer heat-map ticks, a title that fits)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import stepcache.bench.runner as runner
from stepcache.bench import figures
from stepcache.bench.records import NOISE_NOTE, markdown_table, read_records
from stepcache.bench.runner import RunSettings, interleaved, speedup
from stepcache.bench.sweep import LoadedModel, sweep
from stepcache.cli.main import build_parser
from stepcache.core.policy import NoCache
from stepcache.policies.fora import FORA
from helpers import tiny_dit

pytest.importorskip("matplotlib")

SETTINGS = RunSettings(num_samples=2, seed=0, num_steps=4, sampler="ddim", cfg_scale=1.5, warmup=0, repeats=3)


class _Stats:
    nfe, macs_executed, macs_uncached, ideal_speedup = 4, 1.0, 2.0, 2.0

    def share_computed(self):
        return 0.5


def _fake_clock(monkeypatch, seconds: dict):
    """run_once replaced: records the order of the runs and returns scripted times per policy label."""
    calls = []

    def run_once(model, noise, labels, settings, policy, steps=None, progress=False):
        label = runner.policy_label(policy)
        calls.append(label)
        return torch.zeros(2, 1, 4, 4), _Stats(), seconds[label].pop(0)

    monkeypatch.setattr(runner, "run_once", run_once)
    return calls


def test_rounds_interleave_the_policies_and_the_speedup_is_the_median_of_round_ratios(monkeypatch):
    # a machine that slows down 3x during the measurement: round ratios stay 2, ratios of medians would not
    seconds = {"none": [1.0, 2.0, 3.0], "fora(interval=2)": [0.5, 1.0, 1.5], "fora(interval=3)": [0.4, 0.8, 1.2]}
    calls = _fake_clock(monkeypatch, seconds)
    runs = interleaved(None, None, None, SETTINGS, [NoCache(), FORA(interval=2), FORA(interval=3)])
    assert calls == ["none", "fora(interval=2)", "fora(interval=3)"] * 3
    base_times = runs[0][2]
    assert speedup(base_times, runs[1][2]) == (2.0, [2.0, 2.0, 2.0])
    assert speedup(base_times, runs[2][2])[0] == pytest.approx(2.5)
    ratio, ratios = speedup([1.0, 1.0, 10.0], [0.5, 0.5, 0.5])   # one disturbed round does not move the median
    assert ratio == 2.0 and ratios == [2.0, 2.0, 20.0]


def test_defaults_are_three_interleaved_rounds_for_bench_and_demo():
    for command in ("bench", "demo"):
        assert build_parser().parse_args([command]).repeats == 3


def _record(label, method, speed, ideal, ssim=0.9):
    return {"label": label, "config": {"policy": {"method": method}}, "time": {"median_s": 1.0, "speedup": speed,
            "runs_s": [1.0, 1.0, 1.0]}, "work": {"ideal_speedup": ideal}, "quality": {"ssim": ssim, "psnr": 30.0}}


def test_a_speedup_above_the_ideal_is_flagged_as_noise():
    ok, noisy = _record("fora(interval=2)", "fora", 1.8, 2.0), _record("fora(interval=3)", "fora", 3.3, 3.0)
    table = markdown_table([ok, noisy])
    rows = [line for line in table.splitlines() if line.startswith("| fora")]
    assert "| 1.80x |" in rows[0] and "| 3.30x* |" in rows[1]
    assert NOISE_NOTE in table and "median over 3 interleaved" in table
    assert NOISE_NOTE not in markdown_table([ok])
    assert figures.setting_text(noisy) == "interval=3*" and figures.setting_text(ok) == "interval=2"


def test_force_re_measures_and_replaces_records(tmp_path):
    loaded = LoadedModel(tiny_dit(depth=2, hidden=32, heads=2), {"name": "tiny-test"}, embedded=False)
    out, settings = tmp_path / "r.jsonl", RunSettings(2, 0, 4, "ddim", 1.5, 0, 2)
    first = sweep(loaded, ["fora:interval=2"], settings, out, log=lambda m: None)
    logs = []
    sweep(loaded, ["fora:interval=2"], settings, out, log=logs.append)
    assert any("nothing to measure" in m for m in logs)
    again = sweep(loaded, ["fora:interval=2"], settings, out, log=lambda m: None, force=True)
    records = read_records(out)
    assert [r["key"] for r in records] == [r["key"] for r in first]            # replaced, not appended
    assert [r["created"] for r in records] == [r["created"] for r in again]
    assert records[1]["time"]["runs_s"] != first[1]["time"]["runs_s"]         # measured again
    assert len(records[1]["time"]["round_ratios"]) == 2


def test_bench_out_defaults_under_the_output_folder(tmp_path):
    from stepcache.cli.bench import paths

    args = build_parser().parse_args(["bench", "--out-dir", str(tmp_path / "o")])
    assert paths(args) == (tmp_path / "o" / "bench.jsonl", tmp_path / "o")
    args = build_parser().parse_args(["bench", "--out", str(tmp_path / "x" / "b.jsonl")])
    assert paths(args) == (tmp_path / "x" / "b.jsonl", tmp_path / "x")


def test_pareto_figure_labels_every_point_marks_the_ideal_and_has_no_empty_legend_entry():
    base = _record("none", "none", 1.0, 1.0)
    base["quality"] = {"class_accuracy": 0.9}                                  # no SSIM vs itself
    recs = [base, _record("fora(interval=2)", "fora", 1.7, 1.9, 0.95),
            _record("fora(interval=3)", "fora", 2.4, 2.7, 0.9),
            _record("toca(interval=3, fresh_ratio=0.1)", "toca", 1.9, 2.1, 0.93)]
    fig = figures.pareto_figure(recs, "ssim")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["fora", "toca", "ideal speedup (MACs)"] and all(label.strip() for label in labels)
    notes = sorted(t.get_text() for t in ax.texts)
    assert notes == ["interval=2", "interval=3", "interval=3, fresh_ratio=0.1"]
    # the ideal ticks: the scatters outside the legend, one per point, at the MACs speedup and the point's quality
    ideal = sorted((float(x), float(y)) for c in ax.collections if c.get_label().startswith("_")
                   for x, y in c.get_offsets())
    np.testing.assert_allclose(ideal, [(1.9, 0.95), (2.1, 0.93), (2.7, 0.9)])


def test_grid_is_rows_by_columns_with_a_difference_row_per_method():
    ref = torch.rand(12, 1, 6, 6) * 2 - 1
    other = ref.clone()
    other[0, 0, 2, 3] += 0.5
    named = [("uncached", ref), ("fora\n2x", other), ("toca", ref.clone())]
    rows = figures.grid_rows(named, columns=10)
    assert [name for name, _ in rows] == ["uncached", "fora\n2x", "|fora - uncached|", "toca", "|toca - uncached|"]
    image = figures.grid_array(rows, digit=6, scale=4, gap=2)
    assert image.shape == (5 * (6 * 4 + 2) + 2, 10 * (6 * 4 + 2) + 2, 3)
    tile = image[2:2 + 24, 2:2 + 24, 0]                                          # first uncached digit, 4x nearest
    want = ((ref[0, 0].clamp(-1, 1) + 1) / 2).numpy()
    np.testing.assert_allclose(tile, want.repeat(4, 0).repeat(4, 1), rtol=1e-6)
    diff = rows[2][1]
    peak = np.unravel_index(np.argmax(diff.sum(-1)), diff.shape[:2])
    assert peak == (2, 3)                                                       # the changed pixel is the brightest
    fig = figures.grid_figure(named, columns=10)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [name for name, _ in rows]


def test_router_heatmap_has_integer_ticks_and_a_title_that_fits(tmp_path):
    from stepcache.training.l2c_report import heatmap, heatmap_figure

    logits = torch.randn(10, 2)                                                  # one layer: 2 units
    title = "a very long router file name that would run past the edge of a narrow figure.safetensors @ 0.1"
    fig = heatmap_figure(logits, 0.1, title)
    ax = fig.axes[0]
    fig.canvas.draw()
    assert all(float(x).is_integer() for x in ax.get_xticks())
    assert all(t.get_text().isdigit() for t in ax.get_yticklabels())
    renderer = fig.canvas.get_renderer()
    assert ax.title.get_window_extent(renderer).width <= fig.bbox.width
    assert heatmap(logits, 0.1, tmp_path / "h.png", title).stat().st_size > 1000


def test_demo_writes_the_grid_and_records_with_rounds(tmp_path, monkeypatch):
    """The demo end to end on a tiny DiT (the embedded loader is replaced): one record per method, each with
    its per-round ratios, and the grid PNG."""
    import stepcache.bench.demo as demo

    model = tiny_dit(depth=2, hidden=32, heads=2, input_size=8, patch=2)
    loaded = LoadedModel(model, {"name": "tiny"}, embedded=True)
    monkeypatch.setattr(demo, "load_model", lambda name, device, dtype: loaded)
    monkeypatch.setattr(demo, "quality", lambda images, labels, ref, judge: {
        "class_accuracy": 1.0, **({"ssim": 0.9, "psnr": 30.0} if ref is not None else {})})
    result = demo.run_demo(tmp_path, RunSettings(2, 0, 4, "ddim", 1.5, 0, 2), ("fora:interval=2",), log=lambda m: None,
                           progress=False)
    recs = json.loads((tmp_path / "demo_records.json").read_text())
    assert [r["label"] for r in recs] == ["none", "fora(interval=2)"]
    assert len(recs[1]["time"]["round_ratios"]) == 2 and recs[1]["time"]["interleaved"]
    assert result["files"]["grids"].stat().st_size > 1000
