"""File utilities shared by the CLI, sampling and evaluation: atomic writes, PNG and npz images, digests.

Why one place: an output that a kill, a full disk or a bad folder can leave half-written is worse than
none (a later run adopts it), so every file stepcache writes goes through :func:`atomic_write`: a
temporary file in the destination folder, renamed over the destination only when complete. Files get the
mode an ordinary ``open()`` would give them (0666 minus the umask), not ``mkstemp``'s private 0600, so
FID samples stay readable to collaborators. Failures end in one :class:`~stepcache.errors.StepcacheError`
sentence that names the destination, never the temporary name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from stepcache.errors import CheckpointError, StepcacheError

__all__ = ["OutputError", "to_uint8", "atomic_write", "write_json", "write_png", "read_png", "png_ok", "save_grid",
           "save_npz", "save_video", "file_sha256", "check_output_dir", "current_umask"]


class OutputError(StepcacheError):
    """An output file or folder cannot be written (an existing file in the way, no permission, a full disk)."""


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc), else set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable) -> Path:
    """Write ``path`` through ``write(binary_file)`` on a temporary file in the same folder, then rename.

    A kill leaves either the old file or the new one, never a mix; a failure removes the temporary file
    and raises :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot create the folder {path.parent} for {path.name} ({exc.strerror}).") from None
    if path.is_dir():
        raise OutputError(f"Cannot write {path}: it is a folder.")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"Cannot write {path} ({exc.strerror}).") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~current_umask())  # as open() would; mkstemp makes 0600
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"Cannot write {path} ({exc.strerror or type(exc).__name__}).") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | os.PathLike, record: dict) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(record, indent=2, default=str).encode()))


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Atomically write one uint8 (H, W, 3) image."""
    from PIL import Image

    return atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


def read_png(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 (H, W, 3) of a PNG, decoded in full; a truncated, empty or foreign file, or one of another
    ``size`` (H, W), raises :class:`CheckpointError`."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise ValueError("not a PNG")
            im.load()  # decodes every row: a truncated file fails here, not later
            arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise CheckpointError(f"{path} is not a complete PNG image ({type(exc).__name__}).") from None
    if size is not None and arr.shape[:2] != tuple(size):
        raise CheckpointError(f"{path} is {arr.shape[0]}x{arr.shape[1]} pixels, not {size[0]}x{size[1]}.")
    return arr


def png_ok(path: str | os.PathLike, size: tuple[int, int] | None = None) -> bool:
    """Whether ``path`` is a PNG that decodes completely (and has ``size`` (H, W) when given)."""
    try:
        read_png(path, size)
        return True
    except CheckpointError:
        return False


def to_uint8(images) -> np.ndarray:
    """(N, C, H, W) tensor in [-1, 1] -> (N, H, W, 3) uint8 (grey repeated to 3 channels)."""
    import torch

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """An uncompressed npz (ADM's format), written atomically."""
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int = 8, pad: int = 2) -> Path:
    """uint8 (N, H, W, 3) as one PNG grid, upscaled (nearest) to >= 128 px per tile for small images."""
    from PIL import Image

    n, h, w, _ = images.shape
    nrow = min(nrow, n)
    rows = (n + nrow - 1) // nrow
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    scale = max(1, 128 // h)
    im = Image.fromarray(grid)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    return atomic_write(path, lambda f: im.save(f, format="PNG"))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's content (a checkpoint's identity, whatever its name)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    except OSError as exc:
        raise CheckpointError(f"Cannot read {path} ({exc.strerror}).") from None
    return digest.hexdigest()


def check_output_dir(path: str | os.PathLike, option: str = "--out-dir") -> Path:
    """Create ``path`` and prove it writable now, before any minutes of sampling are spent.

    Refuses an existing file and a folder where a file cannot be created, in one sentence naming ``option``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file, not a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".stepcache-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{option} {path} is not a writable folder ({exc.strerror}).") from None
    return path


def save_video(path: str | os.PathLike, frames, fps: float = 24.0) -> Path:
    """Write ``frames`` (T, H, W, 3) — uint8, or floats in [0, 1] as diffusers' video pipelines return with
    ``output_type="np"`` (a list of PIL images works too) — as an mp4 (H.264 through imageio-ffmpeg) or a GIF
    (by the suffix of ``path``). imageio is optional (``pip install 'stepcache[video]'``): without it, one
    sentence says so. The file appears whole or not at all (written beside it, then renamed)."""
    from stepcache.errors import ConfigError, require

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ConfigError(f"A video is written as .mp4 or .gif, got {path.name!r}.")
    imageio = require("imageio.v2", f"Writing {suffix} video")
    if suffix == ".mp4":
        require("imageio_ffmpeg", "Writing .mp4 video")  # the ffmpeg binary
    video = np.stack([np.asarray(f) for f in frames])  # (T, H, W, 3)
    if video.dtype != np.uint8:
        video = (np.clip(video.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ConfigError(f"Video frames must have shape (T, H, W, 3), got {video.shape}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{suffix}")  # the writer picks its format by the suffix
    try:
        if suffix == ".mp4":  # macro_block_size=1: no resizing to multiples of 16 (x264 needs even sides)
            imageio.mimwrite(tmp, video, fps=fps, macro_block_size=1)
        else:
            imageio.mimwrite(tmp, video, duration=1000.0 / fps, loop=0)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"Cannot write {path} ({exc.strerror or type(exc).__name__}).") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
