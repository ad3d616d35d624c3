"""Fault injection on ``stepcache sample-ddp`` (issue 13, items 1 and 2): kill it at random points, damage its
PNGs, resume with the same command — the npz must equal the uninterrupted run's, every time — and rerun it
with other settings or into a foreign folder — it must be refused, naming what differs.

Kills are simulated in-process (an exception thrown out of the PNG writer after a random number of images,
optionally leaving a half-written temporary file, as SIGKILL would) so that many random points fit in
seconds; one real SIGKILL of a separate process checks that the simulation is faithful.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from stepcache import DiT
from stepcache.cli.main import main
from stepcache.sampling import ddp
from helpers import randomize

ROOT = Path(__file__).resolve().parent.parent
KW = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
N, B = 12, 2


class Killed(BaseException):
    """What SIGKILL does to the sampler: it stops, wherever it is, and nothing after it runs."""


def _save_tiny(folder: Path, seed: int = 0) -> Path:
    model = randomize(DiT(**KW), seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "tiny.safetensors"))
    (folder / "tiny.json").write_text(json.dumps({"model": KW}))
    return folder / "tiny.safetensors"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny"))


def _args(ckpt, out, *extra, n=N):
    return ["sample-ddp", "--num-samples", str(n), "--out-dir", str(out), "--per-proc-batch-size", str(B),
            "--global-seed", "5", "--ckpt", str(ckpt), "--steps", "3", "--sampler", "ddpm", "--no-progress",
            "--cache", "fora", "--interval", "2", *extra]


def _npz(out) -> np.ndarray:
    with np.load(Path(out) / "samples.npz") as f:
        return f["arr_0"]


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(_args(ckpt, out)) == 0
    return _npz(out)


def _run_killed(ckpt, out, monkeypatch, after: int, torn: bool) -> bool:
    """Run until ``after`` PNGs are written, then die (leaving a torn temporary file when ``torn``); False when
    the run had fewer than ``after`` PNGs left to write and finished."""
    written = []
    real = ddp.write_png

    def write(path, image):
        if len(written) == after:
            if torn:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                (Path(path).parent / f".{Path(path).name}.killed.tmp").write_bytes(b"\x89PNG\r\n\x1a\n half")
            raise Killed
        real(path, image)
        written.append(path)

    monkeypatch.setattr(ddp, "write_png", write)
    try:
        assert main(_args(ckpt, out)) == 0
        return False
    except Killed:
        return True
    finally:
        monkeypatch.setattr(ddp, "write_png", real)


def _damage(out: Path, rng: random.Random) -> list[str]:
    """Truncate, empty, remove, resize or overwrite a few random PNGs; returns what was done."""
    pngs = sorted((out / "samples").glob("*.png"))
    done = []
    for path in rng.sample(pngs, k=min(len(pngs), rng.randint(1, 3))):
        fault = rng.choice(["truncate", "empty", "remove", "resize", "garbage"])
        data = path.read_bytes()
        if fault == "truncate":
            path.write_bytes(data[: rng.randint(8, len(data) - 1)])
        elif fault == "empty":
            path.write_bytes(b"")
        elif fault == "remove":
            path.unlink()
        elif fault == "resize":                                      # a complete PNG, but of another run's size
            Image.new("RGB", (16, 16), (200, 10, 10)).save(path)
        else:
            path.write_bytes(bytes(rng.randrange(256) for _ in range(len(data))))
        done.append(f"{fault} {path.name}")
    return done


@pytest.mark.parametrize("seed", range(12))
def test_random_kills_and_damaged_pngs_resume_to_the_uninterrupted_npz(ckpt, reference, tmp_path, monkeypatch,
                                                                       seed):
    rng = random.Random(seed)
    kills = 0
    for _ in range(rng.randint(1, 3)):                               # killed once or several times in a row
        if not _run_killed(ckpt, tmp_path, monkeypatch, after=rng.randrange(N), torn=rng.random() < 0.5):
            break
        kills += 1
        assert json.loads((tmp_path / "sample_ddp.json").read_text())["config"]["policy"]["method"] == "fora"
        assert not (tmp_path / "samples.npz").exists()
    assert kills >= 1
    if any((tmp_path / "samples").glob("*.png")):
        faults = _damage(tmp_path, rng)
    else:
        faults = []
    assert main(_args(ckpt, tmp_path)) == 0, faults
    np.testing.assert_array_equal(_npz(tmp_path), reference, err_msg=str(faults))
    assert not list((tmp_path / "samples").glob(".*.tmp"))            # torn writes are cleaned up


def test_damage_after_completion_is_redone(ckpt, reference, tmp_path):
    """Item 2: a complete folder whose PNGs were damaged later (a bad copy) is repaired, not a traceback."""
    assert main(_args(ckpt, tmp_path)) == 0
    (tmp_path / "samples" / "000003.png").write_bytes(b"")
    data = (tmp_path / "samples" / "000010.png").read_bytes()
    (tmp_path / "samples" / "000010.png").write_bytes(data[: len(data) // 2])
    assert main(_args(ckpt, tmp_path)) == 0
    np.testing.assert_array_equal(_npz(tmp_path), reference)
    run = json.loads((tmp_path / "sample_ddp.json").read_text())["runs"][-1]
    assert run["samples_sampled"] == 2 * B                             # the two damaged batches, whole


def test_a_real_sigkill_then_resume(ckpt, tmp_path):
    """The same with a real SIGKILL of a separate process at a random moment after its first PNG."""
    n = 48                                                           # long enough to be killed mid-run
    assert main(_args(ckpt, tmp_path / "whole", n=n)) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "stepcache", *_args(ckpt, out, n=n)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not any((out / "samples").glob("*.png")):
        time.sleep(0.005)
    time.sleep(random.Random(1).uniform(0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "sample_ddp.json").is_file()                        # the record precedes the first sample
    assert not (out / "samples.npz").exists(), "the run finished before it could be killed"
    _damage(out, random.Random(2))
    assert main(_args(ckpt, out, n=n)) == 0
    np.testing.assert_array_equal(_npz(out), _npz(tmp_path / "whole"))


# ------------------------------------------------------------------------------------------- refusals (item 1)
@pytest.mark.parametrize("extra,option", [
    (["--cfg-scale", "2.5"], "--cfg-scale"),
    (["--global-seed", "6"], "--global-seed"),
    (["--steps", "4"], "--steps"),
    (["--per-proc-batch-size", "3"], "--per-proc-batch-size"),
    (["--interval", "3"], "caching options"),
    (["--cache", "toca"], "caching options"),
    (["--sampler", "ddim"], "--sampler"),
    (["--guide-all-channels"], "--guide-all-channels"),
])
def test_killed_run_resumed_with_other_settings_is_refused(ckpt, tmp_path, monkeypatch, capsys, extra, option):
    assert _run_killed(ckpt, tmp_path, monkeypatch, after=4, torn=False)
    before = sorted(p.name for p in (tmp_path / "samples").iterdir())
    args = _args(ckpt, tmp_path)
    for flag, value in zip(extra[::2], extra[1::2] or [None]):
        if flag in args and value is not None:
            args[args.index(flag) + 1] = value
        else:
            args += [flag] + ([value] if value is not None else [])
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another configuration" in err[0] and option in err[0], err
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == before   # nothing touched


def test_other_weights_under_the_same_file_name_are_refused(ckpt, tmp_path, monkeypatch, capsys):
    """The record holds the checkpoint's content hash, not its name."""
    assert _run_killed(ckpt, tmp_path / "out", monkeypatch, after=2, torn=False)
    other = _save_tiny(tmp_path, seed=1)                                          # same name, other weights
    capsys.readouterr()
    assert main(_args(other, tmp_path / "out")) == 2
    assert "weights" in capsys.readouterr().err


def test_a_folder_of_foreign_pngs_is_not_adopted(ckpt, tmp_path, capsys):
    folder = tmp_path / "samples"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "000000.png")
    assert main(_args(ckpt, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no sample_ddp.json" in err[0]
    assert not (tmp_path / "sample_ddp.json").exists()


def test_record_names_everything_that_changes_a_pixel(ckpt, reference, tmp_path):
    assert main(_args(ckpt, tmp_path)) == 0
    config = json.loads((tmp_path / "sample_ddp.json").read_text())["config"]
    assert config["image_size"] == 8 and config["vae"] is None
    assert len(config["weights"]["sha256"]) == 64 and config["weights"]["config"]["hidden_size"] == 32
    assert {"num_samples", "batch_size", "global_seed", "num_steps", "sampler", "cfg_scale", "policy",
            "guide_channels"} <= set(config)
    mode = (tmp_path / "samples.npz").stat().st_mode & 0o777
    assert mode == 0o666 & ~ddp_umask()                                # item 7: not mkstemp's 0600


def ddp_umask() -> int:
    from stepcache.io import current_umask

    return current_umask()
