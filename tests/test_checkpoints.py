"""Checkpoints: official key names, .pt / .safetensors round trips, training-checkpoint dicts, clear errors."""

from __future__ import annotations

import argparse
import urllib.error

import pytest
import torch

from stepcache import CheckpointError, ConfigError, DiT, ModelMismatchError
from stepcache.models import checkpoints as ck

from helpers import randomize, tiny_dit


def spec_keys(depth: int) -> list[str]:
    """The official checkpoints' key names, as listed in specs/dit.md."""
    wb = ("weight", "bias")
    keys = ["pos_embed", "y_embedder.embedding_table.weight"]
    keys += [f"x_embedder.proj.{p}" for p in wb] + [f"t_embedder.mlp.{i}.{p}" for i in (0, 2) for p in wb]
    for i in range(depth):
        for mod in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys += [f"blocks.{i}.{mod}.{p}" for p in wb]
    keys += [f"final_layer.{mod}.{p}" for mod in ("linear", "adaLN_modulation.1") for p in wb]
    return sorted(keys)


@pytest.fixture(scope="module")
def model():
    return tiny_dit(depth=2, hidden=64, heads=4, seed=3)


def outputs(m: DiT) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, m.input_size, m.input_size, generator=g)
    with torch.no_grad():
        return m(x, torch.tensor([5, 900]), torch.tensor([1, 7]))


def test_state_dict_keys_are_the_official_ones(model):
    assert sorted(model.state_dict()) == spec_keys(2)


def test_pt_round_trip_is_exact(model, tmp_path):
    path = ck.save_dit(model, tmp_path / "tiny.pt")
    assert sorted(torch.load(path, weights_only=True)) == spec_keys(2)  # a plain state dict, as DiT saves
    loaded = DiT.from_pretrained(str(path), num_heads=4)
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(outputs(loaded), outputs(model))


def test_safetensors_round_trip_keeps_the_config(model, tmp_path):
    path = ck.save_dit(model, tmp_path / "tiny.safetensors")
    loaded = DiT.from_pretrained(str(path))  # num_heads comes from the stored config
    assert loaded.config == model.config
    assert torch.equal(outputs(loaded), outputs(model))


def test_non_preset_width_without_heads_asks_for_them(model, tmp_path):
    path = ck.save_dit(model, tmp_path / "tiny.pt")
    with pytest.raises(ConfigError, match="num_heads"):
        DiT.from_pretrained(str(path))


def test_training_checkpoint_prefers_ema(model, tmp_path):
    other = randomize(tiny_dit(depth=2, hidden=64, heads=4), seed=9)
    ckpt = {"model": other.state_dict(), "ema": model.state_dict(), "opt": {"state": {}},
            "args": argparse.Namespace(model="DiT-XL/2")}
    torch.save(ckpt, tmp_path / "0001000.pt")
    loaded = DiT.from_pretrained(str(tmp_path / "0001000.pt"), num_heads=4)
    assert torch.equal(outputs(loaded), outputs(model))
    torch.save({"model": other.state_dict()}, tmp_path / "model_only.pt")
    assert torch.equal(outputs(DiT.from_pretrained(str(tmp_path / "model_only.pt"), num_heads=4)), outputs(other))


def test_load_into_a_given_model(model, tmp_path):
    path = ck.save_dit(model, tmp_path / "tiny.pt")
    target = tiny_dit(depth=2, hidden=64, heads=4, seed=5)
    assert DiT.from_pretrained(str(path), model=target) is target
    assert torch.equal(outputs(target), outputs(model))


def test_architecture_inference(tmp_path):
    src = DiT(input_size=16, patch_size=4, in_channels=3, hidden_size=384, depth=3, num_heads=6, mlp_ratio=2.0,
              num_classes=7, learn_sigma=False)
    path = ck.save_dit(randomize(src), tmp_path / "custom.pt")
    cfg = ck.infer_config(ck.read_state_dict(path))
    assert cfg == dict(input_size=16, patch_size=4, in_channels=3, hidden_size=384, depth=3, num_heads=6,
                       mlp_ratio=2.0, class_dropout_prob=0.1, num_classes=7, learn_sigma=False)
    assert DiT.from_pretrained(str(path)).config == src.config


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint file"):
        DiT.from_pretrained(str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_file(model, tmp_path, suffix):
    path = ck.save_dit(model, tmp_path / f"tiny{suffix}")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        DiT.from_pretrained(str(path), num_heads=4)


def test_not_a_dit_state_dict(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="Not a DiT state dict"):
        DiT.from_pretrained(str(tmp_path / "other.pt"))


def test_wrong_input_size(model, tmp_path):
    path = ck.save_dit(model, tmp_path / "tiny.pt")
    with pytest.raises(ModelMismatchError, match="latents of size 8"):
        DiT.from_pretrained(str(path), input_size=16, num_heads=4)
    with pytest.raises(ModelMismatchError, match="another input size"):
        DiT.from_pretrained(str(path), model=tiny_dit(depth=2, hidden=64, heads=4, input_size=16))


def test_wrong_architecture(model, tmp_path):
    path = ck.save_dit(model, tmp_path / "tiny.pt")
    with pytest.raises(ModelMismatchError, match="another architecture"):
        DiT.from_pretrained(str(path), model="DiT-S/2")  # checked on the meta device: nothing allocated
    with pytest.raises(ModelMismatchError):
        DiT.from_pretrained(str(path), model=tiny_dit(depth=3, hidden=64, heads=4))


def test_official_name_offline_fails_with_one_sentence(tmp_path, monkeypatch):
    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setenv("STEPCACHE_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError, match="Could not download .*DiT-XL-2-256x256.pt.*--ckpt") as err:
        DiT.from_pretrained("DiT-XL-2-256x256.pt")
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_official_name_with_wrong_input_size():
    with pytest.raises(ModelMismatchError, match="size 64"):
        DiT.from_pretrained("DiT-XL-2-512x512.pt", input_size=32)


def test_cached_official_file_of_another_architecture_is_rejected(model, tmp_path, monkeypatch):
    monkeypatch.setenv("STEPCACHE_HOME", str(tmp_path))
    ck.save_dit(model, tmp_path / "DiT-XL-2-256x256.pt")
    with pytest.raises(ModelMismatchError):
        DiT.from_pretrained("DiT-XL-2-256x256.pt")


def test_fetch_is_atomic(model, tmp_path, monkeypatch):
    from stepcache.downloads import fetch_file

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    src = ck.save_dit(model, tmp_path / "src.pt")
    dest = tmp_path / "cache" / "copy.pt"
    fetch_file(src.as_uri(), dest, verify=ck.read_state_dict, progress=False)   # through torch.hub, file:// URL
    assert dest.read_bytes() == src.read_bytes()
    from stepcache.io import current_umask

    for path in (src, dest):                           # issue 13 item 7: the umask's mode, not mkstemp's 0600
        assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()

    def reject(path):
        raise CheckpointError("bad file")

    bad = tmp_path / "cache" / "rejected.pt"
    with pytest.raises(CheckpointError, match="bad file"):
        fetch_file(src.as_uri(), bad, verify=reject, progress=False)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.pt"]


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    from stepcache.downloads import DownloadError, fetch_file

    def broken(url, dst, hash_prefix=None, progress=True):
        with open(dst, "wb") as f:
            f.write(b"half a file")
        raise urllib.error.URLError("connection reset")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", broken)
    with pytest.raises(DownloadError, match="Could not download"):
        fetch_file("https://example.invalid/x.pt", tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_downloaded_official_file_is_verified(model, tmp_path):
    path = ck.save_dit(model, tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match="failed verification"):
        ck.verify_official(path, "DiT-XL-2-256x256.pt")



# ------------------------------------------------------------------ issue 13 item 4: stored configs and embedded files
@pytest.mark.parametrize("meta,needle", [("[1, 2]", "not a JSON object"), ('{"colour": 1}', "unknown DiT argument"),
                                         ('{"num_heads": 2, "depth": "deep"}', "cannot build"),
                                         ('{"depth": ', "not a readable")])
def test_stored_dit_config_must_be_an_object_of_dit_arguments(tmp_path, model, meta, needle):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={ck.CONFIG_KEY: meta})
    with pytest.raises(CheckpointError, match=needle):
        ck.load_dit(path)


@pytest.mark.parametrize("weights,config,needle", [
    ("truncated", '{"model": {}}', "not a readable .safetensors"),
    ("garbage", '{"model": {}}', "not a readable .safetensors"),
    ("good", "{not json", "not a readable JSON"),
    ("good", "[1]", "no \"model\" object"),
    ("good", '{"model": {"colour": 1}}', "unknown DiT argument"),
    ("good", '{"model": {"hidden_size": 30, "num_heads": 4}}', "buildable DiT"),
])
def test_embedded_loader_refuses_corrupt_files_in_one_sentence(tmp_path, weights, config, needle):
    import json

    from safetensors.torch import save_file

    from stepcache.models.embedded import load_embedded

    kw = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in DiT(**kw).state_dict().items()}, str(path))
    if weights == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif weights == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    if config == '{"model": {}}':
        config = json.dumps({"model": kw})
    path.with_suffix(".json").write_text(config)
    with pytest.raises(CheckpointError, match=needle):
        load_embedded(path=path)
