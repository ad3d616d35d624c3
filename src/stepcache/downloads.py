"""Downloads of published weights: one cache folder, pinned digests, progress, nothing half-written.

Why one module: a 2.7 GB checkpoint cut short by a dropped connection, or a file replaced upstream, must
never be loaded silently, and a user on an offline machine should learn in one sentence which flag gives
the file instead of waiting for retries. Every download here

- goes to ``cache_home()``: ``$STEPCACHE_HOME``, else ``$XDG_CACHE_HOME/stepcache``, else
  ``~/.cache/stepcache`` (the one folder of every stepcache download; the Hub's own files stay in the
  Hub's cache, which ``huggingface_hub`` manages and points at ``$HF_ENDPOINT`` itself);
- runs ``torch.hub.download_url_to_file`` (progress bar, ``hash_prefix`` = the pinned SHA-256) into a
  temporary name beside the destination, checks the digest again and the caller's structural check, and
  only then renames it into place;
- refuses at once under ``HF_HUB_OFFLINE=1`` (the switch offline users already set for the Hub), naming
  the flag that takes a local file and the cache folder.
"""

from __future__ import annotations

import os
import re
import tempfile
import urllib.error
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from stepcache.errors import CheckpointError

__all__ = ["DownloadError", "ChecksumError", "OfflineError", "cache_home", "hub_offline", "hub_endpoint",
           "hub_url", "fetch_file"]

DEFAULT_HUB = "https://huggingface.co"


class DownloadError(CheckpointError):
    """A file could not be downloaded (network, server, disk)."""


class ChecksumError(DownloadError):
    """A downloaded (or cached) file's SHA-256 is not the pinned one."""


class OfflineError(DownloadError):
    """A download was needed while ``HF_HUB_OFFLINE`` forbids the network."""


def cache_home() -> Path:
    """The folder of every stepcache download (see the module docstring)."""
    env = os.environ.get("STEPCACHE_HOME")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "stepcache"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` set to a true value (the values ``huggingface_hub`` accepts)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_endpoint() -> str:
    """``$HF_ENDPOINT`` (a mirror, or a private hub) without its trailing slash, else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_HUB).rstrip("/")


def hub_url(repo_id: str, filename: str, revision: str = "main") -> str:
    """The download address of ``filename`` in Hub repository ``repo_id`` on :func:`hub_endpoint`."""
    return f"{hub_endpoint()}/{repo_id}/resolve/{revision}/{filename}"


def hub_host() -> str:
    """The host name of :func:`hub_endpoint` (for a quick reachability check)."""
    return urlparse(hub_endpoint()).hostname or "huggingface.co"


def fetch_file(url: str, dest: str | os.PathLike, *, sha256: str | None = None,
               verify: Callable[[Path], object] | None = None, flag: str = "--ckpt",
               progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` unless it is there; the digest (when pinned) and ``verify(tmp)`` are checked
    on a temporary file that is renamed to ``dest`` only when both pass. ``flag`` is the option that takes a
    local file instead, named in the offline and failure messages."""
    import torch.hub

    from stepcache.io import current_umask, file_sha256

    dest = Path(dest)
    if dest.is_file():
        return dest
    if hub_offline():
        raise OfflineError(f"{dest.name} is not in the stepcache cache folder {dest.parent} and HF_HUB_OFFLINE=1 "
                           f"forbids downloading it; pass a local file with {flag} or put it in that folder.")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".download", dir=dest.parent)
        os.close(fd)
    except OSError as err:
        raise DownloadError(f"Cannot write into the cache folder {dest.parent} ({err.strerror}); set "
                            f"STEPCACHE_HOME to a writable folder or pass a local file with {flag}.") from None
    try:
        try:
            torch.hub.download_url_to_file(url, tmp, hash_prefix=sha256, progress=progress)
        except RuntimeError as err:  # torch.hub's own digest check, or an HTTP failure it reports so
            if "hash" not in str(err):
                raise DownloadError(f"Could not download {url} ({err}); check the network or pass a local "
                                    f"file with {flag}.") from None
            got = re.search(r'got "([0-9a-f]+)"', str(err))
            raise ChecksumError(_mismatch(dest.name, url, sha256, got.group(1) if got else "?")) from None
        if sha256 is not None and (digest := file_sha256(tmp)) != sha256.lower():
            raise ChecksumError(_mismatch(dest.name, url, sha256, digest))
        if verify is not None:
            verify(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # as open() would; mkstemp makes 0600
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise DownloadError(f"Could not download {url} ({getattr(err, 'reason', None) or err}); check the network "
                            f"or pass a local file with {flag}.") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def _mismatch(name: str, url: str, expected: str | None, got: str) -> str:
    return (f"The download of {name} from {url} has SHA-256 {got[:16]}..., not the pinned {str(expected)[:16]}...; "
            "it was deleted (a damaged or replaced file).")
