"""``stepcache sample --model STDiT3-...``: latents, a JSON record and the decoding note; clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from stepcache.cli.main import main
from stepcache.models.stdit3 import PRESETS
from tests.stdit3_helpers import TINY, tiny_stdit3


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(PRESETS, "STDiT3-T/2", dict(TINY))
    return "STDiT3-T/2"


def test_sample_writes_latents_record_and_note(tiny_preset, tmp_path, capsys):
    model = tiny_stdit3(0)
    ckpt = tmp_path / "tiny.pt"
    torch.save({k: v for k, v in model.state_dict().items() if k != "rope.freqs"}, ckpt)  # as older exports
    embeds = tmp_path / "text.pt"
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    torch.save({"y": torch.randn(1, 1, 6, 16), "mask": mask}, embeds)
    code = main(["sample", "--model", tiny_preset, "--ckpt", str(ckpt), "--prompt-embeds", str(embeds),
                 "--resolution", "144p", "--num-frames", "17", "--num-sampling-steps", "4", "--cache", "toca",
                 "--out-dir", str(tmp_path / "out")])
    assert code == 0
    stem = tmp_path / "out" / "stdit3-144p-17f-seed0"
    saved = torch.load(f"{stem}.pt")
    assert saved["latents"].shape == (1, 4, 5, 18, 32) and torch.isfinite(saved["latents"]).all()
    record = json.loads(stem.with_suffix(".json").read_text())
    assert record["policy"]["method"] == "toca" and record["result"]["nfe"] == 4
    assert "no OpenSora VAE" in capsys.readouterr().out


def test_sample_without_text_is_one_sentence_and_exit_2(tiny_preset, tmp_path, capsys):
    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny_stdit3(0).state_dict(), ckpt)
    code = main(["sample", "--model", tiny_preset, "--ckpt", str(ckpt), "--out-dir", str(tmp_path)])
    assert code == 2
    assert "--prompt" in capsys.readouterr().err


# ------------------------------------------------------------------------------ video output, bf16
def _tiny_files(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny_stdit3(0).state_dict(), ckpt)
    embeds = tmp_path / "text.pt"
    torch.save({"y": torch.randn(1, 1, 6, 16, generator=torch.Generator().manual_seed(3)),
                "mask": torch.tensor([[1, 1, 1, 1, 0, 0]])}, embeds)
    return ckpt, embeds


def _tiny_vae(folder):
    """A random two-level AutoencoderKL (x2 in space), saved as a diffusers folder."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1)
    vae.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("fmt", ["mp4", "gif"])
def test_sample_with_a_vae_writes_a_video_of_the_latent_frames(tiny_preset, tmp_path, capsys, fmt):
    iio = pytest.importorskip("imageio.v2")
    if fmt == "mp4":
        pytest.importorskip("imageio_ffmpeg")
    ckpt, embeds = _tiny_files(tmp_path)
    vae = _tiny_vae(tmp_path / "vae")
    code = main(["sample", "--model", tiny_preset, "--ckpt", str(ckpt), "--prompt-embeds", str(embeds),
                 "--resolution", "144p", "--num-frames", "17", "--num-sampling-steps", "2", "--vae", str(vae),
                 "--video-format", fmt, "--fps", "8", "--out-dir", str(tmp_path / "out")])
    assert code == 0
    stem = tmp_path / "out" / "stdit3-144p-17f-seed0"
    latents = torch.load(f"{stem}.pt")["latents"]  # (1, 4, 5, 18, 32)
    frames = iio.mimread(f"{stem}.{fmt}")
    assert len(frames) == latents.shape[2] == 5  # one frame per latent frame
    assert frames[0].shape[:2] == (2 * 18, 2 * 32)  # the VAE's x2
    record = json.loads(stem.with_suffix(".json").read_text())
    assert record["videos"] == [f"{stem}.{fmt}"] and "substitute" in capsys.readouterr().out


def test_save_video_without_imageio_is_one_sentence(tmp_path, monkeypatch):
    import sys

    from stepcache.errors import MissingDependencyError
    from stepcache.io import save_video

    monkeypatch.setitem(sys.modules, "imageio", None)
    monkeypatch.setitem(sys.modules, "imageio.v2", None)
    with pytest.raises(MissingDependencyError, match=r"needs imageio, .* pip install 'stepcache\[video\]'\.$"):
        save_video(tmp_path / "a.mp4", torch.zeros(2, 4, 4, 3, dtype=torch.uint8).numpy())
    assert not list(tmp_path.iterdir())


def test_save_video_takes_diffusers_float_frames(tmp_path):
    iio = pytest.importorskip("imageio.v2")
    from stepcache.io import save_video

    frames = torch.rand(3, 8, 10, 3, generator=torch.Generator().manual_seed(0)).numpy()  # output_type="np"
    path = save_video(tmp_path / "v.gif", frames, fps=4)
    back = iio.mimread(path)
    assert len(back) == 3 and back[0].shape[:2] == (8, 10)


def test_bf16_sampling_runs_toca_in_the_model_dtype(tiny_preset, tmp_path):
    ckpt, embeds = _tiny_files(tmp_path)
    args = ["sample", "--model", tiny_preset, "--ckpt", str(ckpt), "--prompt-embeds", str(embeds),
            "--resolution", "144p", "--num-frames", "17", "--num-sampling-steps", "6", "--device", "cpu"]
    assert main(args + ["--dtype", "bf16", "--cache", "toca", "--out-dir", str(tmp_path / "bf")]) == 0
    assert main(args + ["--out-dir", str(tmp_path / "fp")]) == 0
    stem = "stdit3-144p-17f-seed0"
    bf = torch.load(tmp_path / "bf" / f"{stem}.pt")["latents"]
    fp = torch.load(tmp_path / "fp" / f"{stem}.pt")["latents"]
    record = json.loads((tmp_path / "bf" / f"{stem}.json").read_text())
    assert record["dtype"] == "bfloat16" and record["result"]["macs_executed"] < record["result"]["macs_uncached"]
    assert bf.dtype == torch.float32 and torch.isfinite(bf).all()  # latents float32 after the first update
    assert 0 < (bf - fp).abs().max() < 0.5 * fp.abs().max()  # bf16 + ToCa: near the fp32 run, not equal


def test_bf16_caches_hold_the_model_dtype():
    """ToCa on a bf16 STDiT3: the cached branch outputs are bf16 (half the memory of fp32 caches)."""
    import stepcache
    from tests.stdit3_helpers import video_inputs

    bf = torch.bfloat16
    runs = {}
    for dtype in (torch.float32, bf):
        model = tiny_stdit3(0).to(dtype)
        z, y, mask = video_inputs(model, 1, latent=(4, 5, 4, 6))
        sizes = {k: torch.tensor([v], dtype=dtype) for k, v in (("height", 32.0), ("width", 48.0),
                                                                  ("num_frames", 17.0), ("fps", 24.0))}
        runs[dtype] = stepcache.sample(model, z.to(dtype), y.to(dtype), num_steps=6, sampler="rflow", cfg_scale=7.0,
                                       policy=stepcache.ToCa(), mask=mask, return_stats=True, **sizes)
    (fp_out, fp_stats), (bf_out, bf_stats) = runs[torch.float32], runs[bf]
    assert bf_stats.peak_cache_bytes * 2 == fp_stats.peak_cache_bytes
    assert bf_stats.macs_executed == fp_stats.macs_executed and bf_out.dtype == torch.float32
    assert torch.isfinite(bf_out).all() and torch.allclose(bf_out, fp_out, atol=0.2 * fp_out.abs().max())


def test_dit_vae_must_be_ema_or_mse(capsys):
    code = main(["sample", "--model", "DiT-S/8", "--random-weights", "--vae", "some/folder"])
    assert code == 2 and "--vae" in capsys.readouterr().err
