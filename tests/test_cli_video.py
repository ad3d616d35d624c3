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
