"""`stepcache sample`: a real run end to end and every error path (one sentence, exit code 2)."""

import json

import pytest
import torch

from stepcache.cli.main import main
from stepcache.models.dit import DiT
from helpers import randomize


def _err(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.fixture()
def small_ckpt(tmp_path):
    model = randomize(DiT.from_preset("DiT-S/8", input_size=32, depth=2))
    path = tmp_path / "small.pt"
    torch.save(model.state_dict(), path)
    return path


def test_sample_writes_record_and_latents_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    code = main(["sample", "--model", "DiT-S/8", "--random-weights", "--num-sampling-steps", "6", "--class-labels",
                 "1", "2", "--cache", "fora", "--interval", "2", "--out-dir", str(out), "--seed", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Could not decode" in printed and "measured speedup" in printed
    record = json.loads(next(out.glob("*.json")).read_text())
    assert record["policy"] == {"method": "fora", "interval": 2}
    assert record["result"]["nfe"] == 6 and record["baseline"]["nfe"] == 6
    assert record["result"]["macs_executed"] < record["baseline"]["macs_executed"]
    assert record["result"]["ideal_speedup"] > 1
    latents = torch.load(next(out.glob("*.latents.pt")))["latents"]
    assert latents.shape == (2, 4, 32, 32)


@pytest.mark.parametrize("argv,needle", [
    (["--model", "DiT-Q/2"], "Unknown model"),
    (["--model", "DiT-S/8", "--random-weights", "--class-labels", "1000"], "class labels"),
    (["--model", "DiT-S/8", "--random-weights", "--class-labels", "-1"], "class labels"),
    (["--model", "DiT-S/8", "--random-weights", "--cache", "fora", "--interval", "0"], "interval"),
    (["--model", "DiT-S/8", "--random-weights", "--cfg-scale", "0.5"], "cfg"),
    (["--model", "DiT-S/8", "--ckpt", "/nonexistent/model.pt"], "No checkpoint file"),
    (["--model", "DiT-S/2", "--image-size", "256"], "official checkpoint"),
])
def test_bad_input_is_one_sentence_and_exit_2(capsys, argv, needle, tmp_path):
    code, err = _err(capsys, ["sample", "--out-dir", str(tmp_path), "--num-sampling-steps", "2"] + argv)
    assert code == 2
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]


def test_corrupt_and_mismatched_checkpoints(capsys, tmp_path, small_ckpt):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint at all")
    code, err = _err(capsys, ["sample", "--model", "DiT-S/8", "--ckpt", str(bad), "--out-dir", str(tmp_path)])
    assert code == 2 and len(err) == 1
    # a checkpoint for 256px images used at 512px
    code, err = _err(capsys, ["sample", "--model", "DiT-S/8", "--ckpt", str(small_ckpt), "--image-size", "512",
                              "--out-dir", str(tmp_path)])
    assert code == 2 and len(err) == 1


@pytest.mark.parametrize("argv", [["--num-sampling-steps", "0"], ["--image-size", "300"], ["--sampler", "euler"],
                                  ["--cache", "magic"]])
def test_argparse_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(["sample"] + argv)
    assert exc.value.code == 2


@pytest.mark.parametrize("extra", [["--cache", "toca", "--interval", "3", "--score", "kv-norm"],
                                   ["--cache", "l2c"]])
def test_embedded_model_with_toca_and_shipped_l2c_router(tmp_path, capsys, extra):
    code = main(["sample", "--model", "embedded", "--sampler", "ddim", "--num-sampling-steps", "50", "--cfg-scale",
                 "1.5", "--class-labels", "3", "7", "--out-dir", str(tmp_path)] + extra)
    assert code == 0
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["policy"]["method"] == extra[1]
    assert record["result"]["macs_executed"] < record["baseline"]["macs_executed"]
    assert next(tmp_path.glob("*.png")).stat().st_size > 0


def test_l2c_without_router_for_a_native_model(capsys, tmp_path):
    code, err = _err(capsys, ["sample", "--model", "DiT-S/8", "--random-weights", "--cache", "l2c",
                              "--out-dir", str(tmp_path)])
    assert code == 2 and "--router" in err[0]
