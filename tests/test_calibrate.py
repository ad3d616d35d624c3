"""`stepcache calibrate`: the recorded ratios equal diffusers' MagCache calibration, the written file drives
MagCache and TeaCache, and bad input ends in one sentence."""

import json
import re

import pytest
import torch

import stepcache
from stepcache import MagCache, TeaCache
from stepcache.cli.main import main
from stepcache.training.calibrate import calibrate


def test_calibrate_cli_writes_a_file_the_configs_load(tmp_path, capsys, one_thread):
    out = tmp_path / "cal.json"
    code = main(["calibrate", "--model", "embedded", "--num-samples", "2", "--num-sampling-steps", "8",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "MagCache ratios for 8 steps" in printed and "TeaCache coefficients" in printed
    record = json.loads(out.read_text())
    assert record["num_steps"] == 8 and len(record["mag_ratios"]) == 8 and record["mag_ratios"][0] == 1.0
    assert len(record["teacache_coefficients"]) == 5 and record["teacache_pairs"] == 2 * 7
    mag, tea = MagCache(mag_ratios=str(out)), TeaCache(threshold=0.2, coefficients=str(out))
    from stepcache.models.embedded import load_embedded

    model = load_embedded()
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for policy in (mag, tea):
        _, stats = stepcache.sample(model, noise, torch.tensor([1, 2]), num_steps=8, sampler="ddim", cfg_scale=1.5,
                                    policy=policy, return_stats=True)
        assert stats.nfe == 8


def test_calibrate_cli_bad_input_is_one_sentence(tmp_path, capsys):
    code = main(["calibrate", "--pipeline", str(tmp_path / "nope"), "--out", str(tmp_path / "c.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a folder" in err[0]


@pytest.mark.parametrize("family", ["flux", "dit"])
def test_recorded_ratios_equal_diffusers_magcache_calibration(family, capsys, one_thread):
    pytest.importorskip("diffusers")
    from diffusers import MagCacheConfig
    from peers import enable_peer_cache, loud
    from test_diffusers import build_dit, build_flux, run_dit, run_flux

    build, run = {"flux": (loud(build_flux), run_flux), "dit": (loud(build_dit, 1.0), run_dit)}[family]
    steps = 6
    pipe = build()
    enable_peer_cache(pipe.transformer, MagCacheConfig(calibrate=True, num_inference_steps=steps))
    capsys.readouterr()
    run(pipe, steps=steps)
    printed = capsys.readouterr().out
    theirs = [float(v) for v in re.findall(r"\[([-+0-9.e, ]+)\]", printed)[-1].split(",")]  # the printed list
    pipe2 = build()
    ours = calibrate(pipe2, lambda: run(pipe2, steps=steps))
    assert len(theirs) == steps and ours["num_steps"] == steps
    assert ours["mag_ratios"] == pytest.approx(theirs, rel=0, abs=0)
    assert len(ours["teacache_coefficients"]) == 5 and ours["pairs"] == steps - 1  # block 0's modulated input


def test_calibrate_cli_on_a_saved_diffusers_pipeline(tmp_path, capsys, one_thread):
    pytest.importorskip("diffusers")
    from test_diffusers import build_dit

    folder = tmp_path / "tiny-dit"
    build_dit().save_pretrained(folder)
    out = tmp_path / "dit.json"
    code = main(["calibrate", "--pipeline", str(folder), "--num-samples", "2", "--num-sampling-steps", "6",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["family"] == "diffusers.DiTTransformer2DModel" and len(record["mag_ratios"]) == 6
    assert record["teacache_pairs"] == 2 * 5 and len(record["teacache_coefficients"]) == 5
