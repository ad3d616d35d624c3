"""Issue 13 at the library level: silent nonsense refused (item 6), file modes and messages (item 7), the README's
commands (item 7), and the one-sentence errors of the loaders behind the CLI (item 4)."""

from __future__ import annotations

import errno
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import stepcache
from stepcache.cli.main import build_parser, main
from stepcache.errors import CheckpointError, ConfigError, ModelMismatchError
from stepcache.io import OutputError, atomic_write, check_output_dir, write_json
from stepcache.models.embedded import ASSETS
from stepcache.sampling import ddp
from helpers import tiny_dit

ROOT = Path(__file__).resolve().parent.parent
ROUTER = ASSETS / "embedded_router_ddim50.safetensors"


# ------------------------------------------------------------------------------------------- item 6
@pytest.mark.parametrize("cfg", [float("nan"), float("inf"), -float("inf")])
def test_sample_refuses_a_non_finite_guidance_scale(cfg):
    model = tiny_dit(depth=1, hidden=32, heads=2)
    with pytest.raises(ConfigError, match="finite"):
        stepcache.sample(model, torch.randn(1, 4, 8, 8), torch.tensor([1]), 2, "ddim", cfg)


@pytest.mark.parametrize("count", [1, 3])
def test_sample_refuses_a_generator_list_of_the_wrong_length(count):
    model = tiny_dit(depth=1, hidden=32, heads=2)
    gens = [torch.Generator().manual_seed(k) for k in range(count)]
    with pytest.raises(ConfigError, match="one per sample"):
        stepcache.sample(model, torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), 2, "ddpm", 1.5, generator=gens)


def test_global_seeds_that_would_alias_are_refused():
    """2**32 used to give exactly the samples of seed 0 (the seed was masked to 32 bits)."""
    assert ddp.image_seed(2**32 - 1, 0) != ddp.image_seed(0, 0)
    for seed in (2**32, -1):
        with pytest.raises(ConfigError, match="2\\*\\*32"):
            ddp.image_seed(seed, 0)
        with pytest.raises(ConfigError):
            ddp.DDPSampleConfig(num_samples=1, batch_size=1, global_seed=seed, num_steps=1, sampler="ddpm",
                                cfg_scale=1.0, model="m", policy={"method": "none"})


def test_a_router_is_checked_against_model_sampler_and_steps():
    from stepcache.models.embedded import load_embedded

    model = load_embedded()
    assert stepcache.L2C.from_checkpoint(ROUTER, model=model, num_steps=50, sampler="ddim").num_steps == 50
    with pytest.raises(ModelMismatchError, match="ddim sampler"):
        stepcache.L2C.from_checkpoint(ROUTER, model=model, num_steps=50, sampler="ddpm")
    with pytest.raises(ModelMismatchError, match="50 sampling steps"):
        stepcache.L2C.from_checkpoint(ROUTER, model=model, num_steps=20, sampler="ddim")
    other = stepcache.DiT(input_size=16, patch_size=2, in_channels=1, hidden_size=64, depth=6, num_heads=4,
                          num_classes=10, learn_sigma=False)                     # same depth, another model
    with pytest.raises(ModelMismatchError, match="another model .*hidden_size"):
        stepcache.L2C.from_checkpoint(ROUTER, model=other)
    with pytest.raises(ModelMismatchError, match="6-layer"):
        stepcache.L2C.from_checkpoint(ROUTER, model=tiny_dit(depth=2, hidden=32, heads=2))


def test_a_router_of_random_bytes_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "router.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(CheckpointError, match="corrupt or not a router"):
        stepcache.L2C.from_checkpoint(path)


# ------------------------------------------------------------------------------------------- item 7: files
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_respect_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
        ddp.write_png(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))
    finally:
        os.umask(old)
    for name in ("r.json", "x.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_a_failed_write_names_the_destination_not_a_temporary_file(tmp_path):
    def full_disk(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputError) as exc:
        atomic_write(tmp_path / "samples.npz", full_disk)
    assert str(tmp_path / "samples.npz") in str(exc.value) and "No space left" in str(exc.value)
    assert ".tmp" not in str(exc.value) and "read" not in str(exc.value)
    assert os.listdir(tmp_path) == []                                             # nothing half-written
    (tmp_path / "blocker").write_text("")
    with pytest.raises(OutputError, match="blocker"):
        atomic_write(tmp_path / "blocker" / "out.json", lambda f: f.write(b"{}"))
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "blocker")


def test_an_os_error_nobody_expected_is_one_neutral_line(capsys, monkeypatch):
    """The CLI's last resort said "cannot read" even for failed writes."""
    from stepcache.cli import sample

    def boom(args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/some/where/out.json")

    monkeypatch.setattr(sample, "run", boom)                          # add_parser reads it when main() builds
    parser_args = ["sample", "--model", "embedded"]
    assert main(parser_args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["stepcache: error: /some/where/out.json: Permission denied."]


def test_a_folder_where_a_file_is_expected_is_not_called_missing(tmp_path, capsys):
    assert main(["router-report", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is a folder, not a file" in err and "does not exist" not in err


# ------------------------------------------------------------------------------------------- item 7: README
def _readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Command line\s+```bash\n(.*?)```", text, re.S).group(1).replace("\\\n", " ")
    out = []
    for line in block.splitlines():
        words = shlex.split(line)
        if words and words[0] == "stepcache":
            out.append(words[1:])
        elif "-m" in words and "stepcache" in words:
            out.append(words[words.index("stepcache") + 1:])
    return out


def test_every_readme_command_parses():
    commands = _readme_commands()
    assert len(commands) >= 8 and {c[0] for c in commands} >= {"sample", "bench", "sample-ddp", "eval"}
    for argv in commands:
        build_parser().parse_args(argv)                                          # SystemExit(2) on a bad option


def test_readme_embedded_sample_command_runs(tmp_path, one_thread):
    """It failed: the embedded model got DiT's ImageNet labels (207, 360, ...) by default."""
    argv = next(c for c in _readme_commands() if c[:3] == ["sample", "--model", "embedded"])
    assert main(argv + ["--out-dir", str(tmp_path), "--no-baseline"]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 1
