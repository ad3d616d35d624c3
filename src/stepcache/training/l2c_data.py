"""Training data for Learning-to-Cache routers (Ma et al., arXiv 2406.01733, Sec. 4).

The paper trains on real images: center crop, random horizontal flip, SD-VAE latents * 0.18215.
Here a data set is a :class:`RouterData` of model inputs ``x0`` (N, C, H, W) and labels (N,), built
from a latent tensor file, an image folder (VAE-encoded for latent models) or the embedded model's
digits. A VAE data set keeps the posterior mean and std of each image and of its mirror image, so a
batch draws a fresh latent sample per iteration, as the reference does, without re-encoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stepcache.errors import CheckpointError, ConfigError

LATENT_SCALE = 0.18215
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
TENSOR_SUFFIXES = {".pt", ".pth", ".safetensors", ".npz", ".npy"}


@dataclass
class RouterData:
    """``x0`` (N, C, H, W) model inputs, ``labels`` (N,) int64; optional ``std`` for VAE posteriors.

    With ``std`` set, ``x0`` / ``std`` are (2, N, C, H, W): index 0 the image, 1 its mirror image.
    ``flip``: mirror a random half of each batch (for latent or pixel tensors: along the width).
    """

    x0: torch.Tensor
    labels: torch.Tensor
    std: torch.Tensor | None = None
    flip: bool = False
    source: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x0.shape[-3:])

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch (with replacement) drawn only from ``generator``: (B, C, H, W), (B,)."""
        idx = torch.randint(len(self), (size,), generator=generator)
        mirror = (torch.rand(size, generator=generator) < 0.5) if self.flip else torch.zeros(size, dtype=torch.bool)
        if self.std is None:
            x = self.x0[idx]
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        else:
            side = mirror.long()
            mean, std = self.x0[side, idx], self.std[side, idx]  # (B, C, H, W)
            x = (mean + std * torch.randn(mean.shape, generator=generator)) * LATENT_SCALE
        return x, self.labels[idx]


def check_data(data: RouterData, model) -> None:
    """Refuse data that do not fit the model (shape, labels)."""
    want = (model.in_channels, model.input_size, model.input_size)
    if data.sample_shape != want:
        raise ConfigError(f"the training data have samples of shape {data.sample_shape} but the model expects {want}.")
    if len(data) == 0:
        raise ConfigError("the training data set is empty.")
    if int(data.labels.min()) < 0 or int(data.labels.max()) >= model.num_classes:
        raise ConfigError(f"training labels must lie in 0..{model.num_classes - 1}.")


def load_data(spec: str, model, *, latent: bool, vae: str = "ema", flip: bool | None = None) -> RouterData:
    """``embedded`` / ``digits[:split]``, a latent tensor file, or an image folder (``ImageFolder`` layout)."""
    if spec == "embedded" or spec.startswith("digits"):
        split = spec.partition(":")[2] or "train"
        data = digits(split, model)
    else:
        path = Path(spec)
        if path.is_dir():
            data = image_folder(path, model, latent=latent, vae=vae)
        elif path.is_file() and path.suffix.lower() in TENSOR_SUFFIXES:
            data = tensor_file(path)
        elif path.is_file():
            raise ConfigError(f"{path} is not a supported data file; use {', '.join(sorted(TENSOR_SUFFIXES))} "
                              "or an image folder.")
        else:
            raise CheckpointError(f"training data {spec} does not exist.")
    if flip is not None:
        data.flip = flip
    check_data(data, model)
    return data


def digits(split: str, model) -> RouterData:
    """The embedded model's digits (pixel space, no flips: digits are not mirror-symmetric)."""
    from stepcache.models.embedded import digits_data

    images, labels = digits_data(split, resolution=model.input_size)
    return RouterData(images, labels, flip=False, source=f"digits:{split}")


# ---------------------------------------------------------------------------------------- tensor files
def _pick(d: dict, names: tuple[str, ...], path: Path, what: str):
    for name in names:
        if name in d:
            return d[name]
    raise CheckpointError(f"{path} has no {what} entry (looked for {', '.join(names)}).")


def tensor_file(path: Path) -> RouterData:
    """Latents (N, C, H, W) + labels (N,) from .pt/.pth/.safetensors/.npz (keys latents|x, labels|y)
    or .npy (latents, with labels in ``<stem>_labels.npy`` beside it)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            lab = path.with_name(path.stem + "_labels.npy")
            if not lab.is_file():
                raise CheckpointError(f"{path} holds latents only; put their labels in {lab.name} beside it.")
            d = {"latents": np.load(path, allow_pickle=False), "labels": np.load(lab, allow_pickle=False)}
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            d = load_file(str(path))
        else:
            d = torch.load(str(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable latent tensor file ({type(exc).__name__}).") from None
    if isinstance(d, (tuple, list)) and len(d) == 2:
        d = {"latents": d[0], "labels": d[1]}
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} must hold a dict with latents and labels.")
    x = torch.as_tensor(_pick(d, ("latents", "x", "x0"), path, "latents")).float()
    y = torch.as_tensor(_pick(d, ("labels", "y"), path, "labels")).long()
    if x.dim() != 4 or y.shape != (x.shape[0],):
        raise CheckpointError(f"{path}: latents must be (N, C, H, W) and labels (N,), got {tuple(x.shape)} and "
                              f"{tuple(y.shape)}.")
    return RouterData(x.contiguous(), y, flip=False, source=str(path))


# ---------------------------------------------------------------------------------------- image folders
def _image_files(root: Path) -> tuple[list[Path], list[int]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"{root} has no class subfolders (expected root/<class>/<image>).")
    files, labels = [], []
    for k, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(k)
    if not files:
        raise ConfigError(f"{root} has no images.")
    return files, labels


def center_crop(image, size: int):
    """ADM's center crop: box-halve while large, bicubic resize of the short side, crop the center."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _read_images(files: list[Path], size: int, mode: str) -> torch.Tensor:
    """(N, C, size, size) in [-1, 1]."""
    from PIL import Image

    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(center_crop(im.convert(mode), size), dtype=np.float32)
        except OSError:
            raise CheckpointError(f"{f} is not a readable image.") from None
        arr = arr[..., None] if arr.ndim == 2 else arr
        out.append(torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out)


def image_folder(root: Path, model, *, latent: bool, vae: str = "ema", batch: int = 16) -> RouterData:
    files, labels = _image_files(root)
    y = torch.tensor(labels, dtype=torch.long)
    if not latent:
        mode = {1: "L", 3: "RGB"}.get(model.in_channels)
        if mode is None:
            raise ConfigError(f"cannot read images for a pixel-space model with {model.in_channels} channels.")
        return RouterData(_read_images(files, model.input_size, mode), y, flip=True, source=str(root))
    encoder = load_vae(vae)
    images = _read_images(files, model.input_size * 8, "RGB")  # (N, 3, 8h, 8w)
    means, stds = [], []
    for side in (images, images.flip(-1)):
        m, s = [], []
        with torch.no_grad():
            for chunk in side.split(batch):
                dist = encoder.encode(chunk).latent_dist
                m.append(dist.mean)
                s.append(dist.std)
        means.append(torch.cat(m))
        stds.append(torch.cat(s))
    return RouterData(torch.stack(means), y, std=torch.stack(stds), flip=True, source=str(root))


def load_vae(vae: str = "ema"):
    """The SD VAE from the local Hugging Face cache (no download is attempted here)."""
    try:
        from diffusers.models import AutoencoderKL
    except Exception:
        raise ConfigError("encoding an image folder needs diffusers (pip install 'stepcache[diffusers]').") from None
    import warnings

    repo = f"stabilityai/sd-vae-ft-{vae}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoencoderKL.from_pretrained(repo, local_files_only=True).eval()
    except Exception:
        raise CheckpointError(f"the VAE {repo} is not in the local Hugging Face cache; download it first or pass "
                              "a latent tensor file with --data.") from None
