"""`stepcache sample-ddp`: torchrun with 2 CPU processes, kill-and-resume, npz format, per-image seeds."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stepcache import DiT
from stepcache.cli.main import main
from stepcache.sampling import ddp
from helpers import randomize

ROOT = Path(__file__).resolve().parent.parent
KW = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny pixel-space DiT in the embedded model's file format (.safetensors + .json config)."""
    folder = tmp_path_factory.mktemp("tiny")
    model = randomize(DiT(**KW))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "tiny.safetensors"))
    (folder / "tiny.json").write_text(json.dumps({"model": KW}))
    return folder / "tiny.safetensors"


def _args(ckpt, out, n=12, steps=4, extra=()):
    return ["sample-ddp", "--num-samples", str(n), "--out-dir", str(out), "--per-proc-batch-size", "2",
            "--global-seed", "3", "--ckpt", str(ckpt), "--steps", str(steps), "--sampler", "ddpm", *extra]


def _torchrun(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "stepcache",
           *args, "--no-progress"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            **kw)


def _kill_job(proc):
    """SIGKILL the torchrun launcher we started and its worker processes (found by parent pid)."""
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in [int(c) for c in children] + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _finish(proc, timeout=120):
    try:
        return proc.communicate(timeout=timeout)[0].decode()
    except subprocess.TimeoutExpired:
        _kill_job(proc)
        raise


def _npz(out):
    with np.load(Path(out) / "samples.npz") as f:
        assert f.files == ["arr_0"]
        return f["arr_0"]


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """An uninterrupted single-process run (in-process), the baseline every other run must reproduce."""
    out = tmp_path_factory.mktemp("single")
    assert main(_args(ckpt, out, extra=["--cache", "fora", "--interval", "2", "--no-progress"])) == 0
    return out


def test_npz_format_and_record(reference):
    arr = _npz(reference)
    assert arr.dtype == np.uint8 and arr.shape == (12, 8, 8, 3)
    assert (arr[..., 0] == arr[..., 2]).all()                                  # grey repeated to 3 channels
    assert len(list((reference / "samples").glob("*.png"))) == 12
    record = json.loads((reference / "sample_ddp.json").read_text())
    assert record["config"]["policy"] == {"method": "fora", "interval": 2}
    assert record["config"]["global_seed"] == 3 and record["config"]["batch_size"] == 2
    run = record["runs"][0]
    assert run["samples_sampled"] == 12 and run["world_size"] == 1 and run["samples_per_second"] > 0


def test_killed_then_resumed_gives_identical_npz(ckpt, tmp_path):
    # 48 samples (24 batches): on a quiet machine 12 were all written before the kill landed
    n = 48
    whole = tmp_path / "whole"
    assert main(_args(ckpt, whole, n=n, extra=["--cache", "fora", "--interval", "2", "--no-progress"])) == 0
    tmp_path = tmp_path / "killed"
    args = _args(ckpt, tmp_path, n=n, extra=["--cache", "fora", "--interval", "2"])
    proc = _torchrun(args)
    pngs = tmp_path / "samples"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None and not any(pngs.glob("*.png")):
        time.sleep(0.02)
    _kill_job(proc)                                                            # like a scheduler killing the job
    written = len(list(pngs.glob("*.png")))
    assert 0 < written < n and not (tmp_path / "samples.npz").exists()
    (pngs / "000011.png").unlink(missing_ok=True)
    (pngs / ".000005.png.stale.tmp").write_bytes(b"half a png")               # leftovers of a killed write
    first = sorted(pngs.glob("*.png"))[0]
    first.write_bytes(first.read_bytes()[:40])                                 # a torn PNG: checked on both ranks
    proc = _torchrun(args)
    log = _finish(proc)
    assert proc.returncode == 0, log
    # 2 ranks, killed and resumed == 1 rank uninterrupted, bit for bit.
    np.testing.assert_array_equal(_npz(tmp_path), _npz(whole))
    run = json.loads((tmp_path / "sample_ddp.json").read_text())["runs"][-1]
    assert run["samples_skipped"] > 0 and run["samples_sampled"] + run["samples_skipped"] == n
    assert run["world_size"] == 2 and len(run["rank_seconds"]) == 2


def test_rerun_with_other_config_is_refused_and_complete_run_is_a_noop(ckpt, reference, capsys):
    before = (reference / "samples.npz").read_bytes()
    assert main(_args(ckpt, reference, extra=["--cache", "fora", "--interval", "2", "--no-progress"])) == 0
    assert (reference / "samples.npz").read_bytes() == before
    assert json.loads((reference / "sample_ddp.json").read_text())["runs"][-1]["samples_sampled"] == 0
    capsys.readouterr()
    assert main(_args(ckpt, reference, extra=["--no-progress"])) == 2              # uncached into a FORA folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another configuration" in err[0]


def test_each_image_depends_only_on_its_seed(ckpt):
    from stepcache.models.embedded import load_embedded

    model = load_embedded(path=ckpt)
    cfg = ddp.DDPSampleConfig(num_samples=4, batch_size=2, global_seed=3, num_steps=3, sampler="ddpm",
                              cfg_scale=1.5, model="tiny", policy={"method": "none"})
    x01, y01 = ddp.sample_batch(model, range(0, 2), cfg, torch.device("cpu"))
    x12, y12 = ddp.sample_batch(model, range(1, 3), cfg, torch.device("cpu"))
    assert y01[1] == y12[0]
    torch.testing.assert_close(x01[1], x12[0], atol=1e-5, rtol=0)            # same seed, other batch mate
    assert not torch.allclose(x01[0], x01[1])
    assert ddp.image_seed(3, 1) != ddp.image_seed(3, 2) != ddp.image_seed(4, 1)


def test_a_refusal_under_torchrun_is_one_sentence_on_every_rank(ckpt, tmp_path):
    """Rank 0 decides and broadcasts the refusal: no rank is left to die on a closed connection."""
    (tmp_path / "samples").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "samples" / "000000.png")         # PNGs from elsewhere, no record
    proc = _torchrun(_args(ckpt, tmp_path))
    log = _finish(proc)
    assert proc.returncode != 0
    errors = [line for line in log.splitlines() if line.startswith("stepcache: error:")]
    assert len(errors) == 2 and all("no sample_ddp.json" in e for e in errors), log
    assert "Connection" not in log and "closed" not in log, log
