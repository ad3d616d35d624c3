"""Issue 12, downloads: pinned digests, one cache folder, HF_ENDPOINT / HF_HUB_OFFLINE, nothing half-written.

The download function (``torch.hub.download_url_to_file``) is replaced by fakes: no network at test time.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from stepcache import DiT
from stepcache.cli.main import main
from stepcache.downloads import (ChecksumError, OfflineError, cache_home, fetch_file, hub_endpoint, hub_host,
                                 hub_url)
from stepcache.eval import features
from stepcache.models import checkpoints as ck


@pytest.fixture
def online(monkeypatch, tmp_path):
    """A clean environment: the cache folder in tmp, no offline switch, no mirror."""
    for var in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "STEPCACHE_INCEPTION", "STEPCACHE_INCEPTION_SHA256"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("STEPCACHE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _fake_download(payload: bytes, calls: list):
    """A download that writes ``payload`` and, like a server that replaced the file, ignores the digest."""
    def download(url, dst, hash_prefix=None, progress=True):
        calls.append({"url": url, "hash_prefix": hash_prefix, "progress": progress})
        with open(dst, "wb") as f:
            f.write(payload)
    return download


def test_one_cache_folder_for_every_download(online, monkeypatch, tmp_path):
    assert cache_home() == online
    assert ck.cache_dir() == online
    assert features.default_inception_path() == online / features.INCEPTION_FILE
    monkeypatch.delenv("STEPCACHE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_home() == tmp_path / "xdg" / "stepcache" == ck.cache_dir()
    monkeypatch.setenv("STEPCACHE_INCEPTION", str(tmp_path / "mine.pt"))  # a file override, documented
    assert features.default_inception_path() == tmp_path / "mine.pt"


def test_pinned_digests_are_full_sha256():
    for digest in (ck.OFFICIAL_SHA256["DiT-XL-2-256x256.pt"], features.INCEPTION_SHA256):
        assert len(digest) == 64 and int(digest, 16) >= 0
    assert "DiT-XL-2-512x512.pt" not in ck.OFFICIAL_SHA256  # no public digest found: trust on first use


def test_official_checkpoint_with_the_wrong_digest_is_refused_and_deleted(online, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fake_download(b"not the DiT weights", calls))
    with pytest.raises(ChecksumError, match="DiT-XL-2-256x256.pt .*SHA-256") as err:
        DiT.from_pretrained("DiT-XL-2-256x256.pt")
    assert "\n" not in str(err.value)
    assert calls == [{"url": ck.BASE_URL + "DiT-XL-2-256x256.pt", "progress": True,
                      "hash_prefix": ck.OFFICIAL_SHA256["DiT-XL-2-256x256.pt"]}]   # torch.hub checks it too
    assert list(online.iterdir()) == []                                           # nothing left behind


def test_torch_hub_digest_failure_is_the_same_typed_error(online, monkeypatch):
    def hub_checks(url, dst, hash_prefix=None, progress=True):
        raise RuntimeError(f'invalid hash value (expected "{hash_prefix}", got "{"ab" * 32}")')

    monkeypatch.setattr(torch.hub, "download_url_to_file", hub_checks)
    with pytest.raises(ChecksumError, match="abababab"):
        fetch_file("https://example.invalid/w.pt", online / "w.pt", sha256="0" * 64)
    assert list(online.iterdir()) == []


def test_matching_digest_is_renamed_into_place(online, monkeypatch):
    payload = b"weights"
    calls = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fake_download(payload, calls))
    digest = hashlib.sha256(payload).hexdigest()
    path = fetch_file("https://example.invalid/w.pt", online / "w.pt", sha256=digest)
    assert path.read_bytes() == payload and [p.name for p in online.iterdir()] == ["w.pt"]
    fetch_file("https://example.invalid/w.pt", online / "w.pt", sha256=digest)   # cached: no second download
    assert len(calls) == 1


def test_inception_download_with_the_wrong_digest_is_refused(online, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fake_download(b"an impostor", []))
    with pytest.raises(ChecksumError, match="inception-2015-12-05.pt"):
        features.InceptionFeatures()
    assert not online.exists() or list(online.iterdir()) == []


def _no_download(*args, **kwargs):
    raise AssertionError("downloaded while HF_HUB_OFFLINE=1")


@pytest.mark.parametrize("load,flag,name", [
    (lambda: DiT.from_pretrained("DiT-XL-2-512x512.pt"), "--ckpt", "DiT-XL-2-512x512.pt"),
    (lambda: features.InceptionFeatures(), "--inception", "inception-2015-12-05.pt"),
])
def test_offline_fails_fast_naming_the_flag_and_the_folder(online, monkeypatch, load, flag, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    with pytest.raises(OfflineError) as err:
        load()
    msg = str(err.value)
    assert flag in msg and str(online) in msg and name in msg and "\n" not in msg


def test_offline_cli_is_one_line_naming_ckpt(online, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    code = main(["sample", "--model", "DiT-XL/2", "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--ckpt" in err[0] and str(online) in err[0]


def test_hf_endpoint_is_used_for_hub_addresses(online, monkeypatch):
    assert hub_url("facebook/DiT-XL-2-256", "model_index.json") == \
        "https://huggingface.co/facebook/DiT-XL-2-256/resolve/main/model_index.json"
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example.org/")
    assert hub_endpoint() == "https://hf-mirror.example.org" and hub_host() == "hf-mirror.example.org"
    assert hub_url("facebook/DiT-XL-2-256", "model_index.json") == \
        "https://hf-mirror.example.org/facebook/DiT-XL-2-256/resolve/main/model_index.json"

    import socket

    from stepcache.cli.common import hub_reachable

    seen = []

    class Conn:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda addr, timeout=None: seen.append(addr) or Conn())
    assert hub_reachable() and seen == [("hf-mirror.example.org", 443)]      # the mirror, not huggingface.co
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_reachable() and len(seen) == 1


def test_no_hub_host_is_hard_coded_in_the_sources():
    """Only stepcache.downloads knows the default Hub; every other string constant goes through it."""
    import ast
    from pathlib import Path

    import stepcache

    def literals(tree):
        docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef,
                ast.ClassDef)) and n.body and isinstance(n.body[0], ast.Expr)}
        return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                and id(n) not in docs]

    root = Path(stepcache.__file__).parent
    offenders = [(p.relative_to(root), n.lineno) for p in root.rglob("*.py") if p.name != "downloads.py"
                 for n in literals(ast.parse(p.read_text())) if "huggingface.co" in n.value]
    assert offenders == []
