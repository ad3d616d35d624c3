"""stepcache bench / demo: policy specs, well-formed records that are never appended twice, reports."""

from __future__ import annotations

import json

import pytest

from stepcache.bench.methods import build_policy, method_unavailable, parse_spec, policy_label
from stepcache.bench.records import config_key, markdown_table, pareto_front, read_records
from stepcache.bench.runner import RunSettings
from stepcache.bench.sweep import LoadedModel, sweep, write_reports
from stepcache.cli.main import main
from stepcache.errors import CheckpointError, ConfigError
from stepcache.policies.fora import FORA
from helpers import tiny_dit

TINY = RunSettings(num_samples=2, seed=0, num_steps=4, sampler="ddim", cfg_scale=1.5, warmup=0, repeats=1)


def test_parse_and_build_specs():
    assert parse_spec("toca:interval=3,fresh_ratio=0.1") == ("toca", {"interval": 3, "fresh_ratio": 0.1})
    assert build_policy("fora:interval=4", 10, "ddim") == FORA(interval=4)
    assert policy_label(FORA(interval=4)) == "fora(interval=4)"
    assert method_unavailable("none", 10, "ddim", True) is None
    assert "not implemented" in method_unavailable("nosuch", 10, "ddim", True)
    assert method_unavailable("teacache", 10, "ddim", True) is None
    with pytest.raises(ConfigError):
        build_policy("fora:interval", 10, "ddim")
    with pytest.raises(ConfigError):
        build_policy("fora:interval=0", 10, "ddim")
    with pytest.raises(ConfigError):
        build_policy("nosuch", 10, "ddim")
    with pytest.raises(CheckpointError):
        build_policy("l2c", 7, "ddim", embedded=False)


def test_config_key_is_order_independent():
    assert config_key({"a": 1, "b": [1, 2]}) == config_key({"b": [1, 2], "a": 1})
    assert config_key({"a": 1}) != config_key({"a": 2})


def test_sweep_records_are_well_formed_and_not_duplicated(tmp_path):
    loaded = LoadedModel(tiny_dit(depth=2, hidden=32, heads=2), {"name": "tiny-test"}, embedded=False)
    out = tmp_path / "r.jsonl"
    logs = []
    records = sweep(loaded, ["fora:interval=2", "l2c"], TINY, out, log=logs.append)
    assert any("skipping l2c" in m for m in logs)
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and len(records) == 2
    base, fora = (json.loads(line) for line in lines)
    for r in (base, fora):
        assert set(r) >= {"key", "label", "config", "environment", "time", "work", "quality", "created"}
        assert r["key"] == config_key(r["config"])
        assert r["time"]["median_s"] > 0 and r["work"]["nfe"] == TINY.num_steps
        assert r["environment"]["torch"] and r["environment"]["torch_threads"] >= 1
    assert base["config"]["policy"] == {"method": "none"} and base["time"]["speedup"] == 1.0
    assert fora["work"]["macs_executed"] < fora["work"]["macs_uncached"] and fora["work"]["ideal_speedup"] > 1.2
    assert fora["quality"]["psnr"] > 0 and -1 <= fora["quality"]["ssim"] <= 1
    # same arguments again: nothing new is appended; a new setting adds exactly one line
    again = sweep(loaded, ["fora:interval=2"], TINY, out, log=logs.append)
    assert len(out.read_text().splitlines()) == 2 and [r["key"] for r in again] == [base["key"], fora["key"]]
    sweep(loaded, ["fora:interval=3"], TINY, out, log=logs.append)
    assert len(read_records(out)) == 3
    files = write_reports(read_records(out), tmp_path, stem="r")
    table_rows = [line for line in files["table"].read_text().splitlines() if line.startswith("|")]
    assert files["plot"].stat().st_size > 0 and len(table_rows) == 5
    assert pareto_front(read_records(out))  # at least one non-dominated point


def test_markdown_table_has_one_row_per_record(tmp_path):
    rec = {"label": "x", "time": {"median_s": 1.0, "speedup": 2.0}, "work": {"ideal_speedup": 2.5},
           "quality": {"psnr": 30.0, "ssim": 0.9, "class_accuracy": None, "frechet_distance": None}}
    table = markdown_table([rec, rec])
    assert table.count("| x |") == 2 and "2.50x" in table


def test_read_records_rejects_corrupt_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": 1}\nnot json\n')
    with pytest.raises(ConfigError):
        read_records(bad)


def test_demo_runs_on_a_tiny_setting(tmp_path, capsys):
    code = main(["demo", "--out-dir", str(tmp_path), "--num-samples", "3", "--num-sampling-steps", "4",
                 "--policies", "fora:interval=2", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "fora(interval=2)" in out and "| none |" in out
    for name in ("demo_grids.png", "demo_speed_quality.png", "demo_table.md", "demo_records.json"):
        assert (tmp_path / name).stat().st_size > 0


def test_bench_cli_bad_policy_is_one_sentence(tmp_path, capsys):
    code = main(["bench", "--policies", "fora:interval=x", "--out", str(tmp_path / "b.jsonl"),
                 "--num-samples", "2", "--num-sampling-steps", "2", "--repeats", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("stepcache: error:") and "Traceback" not in err
