"""Image features for the ADM metrics: the FID Inception network, or the embedded model's digit classifier.

``inception``: the TorchScript port of TensorFlow's ``inception-2015-12-05`` graph made for StyleGAN2-ADA and
used by EDM (``inception-2015-12-05.pt``, :data:`INCEPTION_URL`; ``torch.jit.load``). It is the network the
ADM evaluator runs (``classify_image_graph_def.pb``), so with the same images:

- ``pool`` (FID, precision/recall): the network's ``pool_3`` features (2048), from its own forward
  (``return_features=True``), which resizes to 299x299 as TF's legacy bilinear resize does.
  Same weights and same graph as ADM; differences are float kernels only (ADM runs TF).
- ``probs`` (Inception Score): softmax of ``pool_3 @ W`` without the output bias (``no_output_bias=True``,
  1008 classes), as ADM's ``_create_softmax_graph`` does.
- ``spatial`` (sFID): ADM takes ``mixed_6/conv`` (17x17x192, after its ReLU) and keeps the first 7 channels,
  flattened in TF's NHWC order (17*17*7 = 2023). Here the same resize and (x - 128) / 128 normalisation
  are done by :func:`tf_bilinear_resize`, then the TorchScript ``layers`` are run up to ``mixed_6.conv``, the
  first 7 channels taken and flattened **in HWC order** so that the statistics are comparable with ADM's
  precomputed ``mu_s``/``sigma_s``. This re-implements the resize rather than calling the module's private
  one, so it is approximate to float rounding; it has not been compared against TF here (no network).

``digits``: ``stepcache.eval.digits.load_digit_classifier()`` (features and logits of a small classifier
trained on the embedded model's data). Runs offline; numbers are NOT comparable with Inception ones.
It has no spatial features, so sFID is reported as ``None``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stepcache.errors import CheckpointError, ConfigError
from stepcache.downloads import ChecksumError, DownloadError, OfflineError, cache_home, fetch_file

__all__ = ["ImageFeatures", "InceptionFeatures", "DigitFeatures", "extract_features", "load_extractor",
           "INCEPTION_URL", "default_inception_path"]

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FILE = "inception-2015-12-05.pt"
# SHA-256 of the file at INCEPTION_URL (95,607,719 bytes). NVIDIA publishes none; this is the digest pinned for
# that URL by k-diffusion (crowsonkb/k-diffusion, k_diffusion/evaluation.py, ``InceptionV3FeatureExtractor``)
# and by several other public FID codes, and the Git LFS oid of Hub copies of the file
# (huggingface.co/hngan/webui-models commit 1686c49). ``sha256=`` or $STEPCACHE_INCEPTION_SHA256 override it
# (another build of the network). The digest is checked on download and on every load; the digest of a file
# given by path is also kept beside it (``.sha256``) so that a later replacement is refused.
INCEPTION_SHA256: str | None = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
INCEPTION_SIZE = 299
SPATIAL_CHANNELS = 7      # ADM: spatial[..., :7]
# The TorchScript module's sequential layers up to (and including) mixed_6's first conv, as in the TF graph.
SPATIAL_PATH = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
                "mixed_3", "mixed_4", "mixed_5")


@dataclass
class ImageFeatures:
    """Per-image features: ``pool`` (N, F), ``spatial`` (N, S) or None, ``probs`` (N, C) or None; float64."""

    pool: np.ndarray
    spatial: np.ndarray | None
    probs: np.ndarray | None


def default_inception_path() -> Path:
    """``$STEPCACHE_INCEPTION`` (a file path override, like ``--inception``) if set, else
    ``inception-2015-12-05.pt`` in the one stepcache cache folder (``$STEPCACHE_HOME``, see stepcache.downloads)."""
    env = os.environ.get("STEPCACHE_INCEPTION")
    if env:
        return Path(env).expanduser()
    return cache_home() / INCEPTION_FILE


def tf_bilinear_resize(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 255] -> (N, 3, size, size) in [-1, 1) like the TF graph's input stage.

    TF1's ``ResizeBilinear`` (no half-pixel centres) samples source pixel ``i * H / size``; an affine grid
    with a shift of ``1/H - 1/size`` reproduces that with ``grid_sample``. Then ``(x - 128) / 128``.
    """
    n, c, h, w = images.shape
    theta = torch.tensor([[1.0, 0.0, 1.0 / w - 1.0 / size], [0.0, 1.0, 1.0 / h - 1.0 / size]],
                         dtype=images.dtype, device=images.device).expand(n, 2, 3)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)        # (N, size, size, 2)
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128.0) / 128.0


class InceptionFeatures:
    """The FID Inception network (TorchScript, see module docstring); call it on uint8 (N, H, W, 3)."""

    name = "inception"

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu", download: bool = True,
                 sha256: str | None = None):
        given = bool(path) or bool(os.environ.get("STEPCACHE_INCEPTION"))
        path = Path(path) if path else default_inception_path()
        override = sha256 or os.environ.get("STEPCACHE_INCEPTION_SHA256")
        if path.is_dir():
            raise CheckpointError(f"The FID Inception weights {path} are a folder, not the .pt file.")
        if not path.is_file():
            if not download:
                raise CheckpointError(f"The FID Inception weights {path} do not exist.")
            try:  # atomic, and renamed into place only after the checksum and a trial load pass
                fetch_file(INCEPTION_URL, path, sha256=override or INCEPTION_SHA256, flag="--inception",
                           verify=lambda tmp: _load_inception(tmp, "cpu", None))
            except (OfflineError, ChecksumError):
                raise
            except DownloadError:
                raise CheckpointError(
                    f"The FID Inception weights are not at {path} and could not be downloaded from {INCEPTION_URL}; "
                    "download that file and pass its path with --inception.") from None
        # The file in the cache folder must be the pinned one; a file the user names (--inception,
        # $STEPCACHE_INCEPTION) must match --inception-sha256 when given, else the digest it had when first used.
        expected = override or (_remembered_digest(path) if given else INCEPTION_SHA256)
        self.net, self.sha256 = _load_inception(path, device, expected)
        self.official = self.sha256 == INCEPTION_SHA256
        _remember_digest(path, self.sha256)
        self.device = torch.device(device)

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 255] -> (N, 2023): mixed_6/conv, first 7 channels, flattened in NHWC order."""
        h = tf_bilinear_resize(x)
        layers = self.net.layers
        for name in SPATIAL_PATH:
            h = getattr(layers, name)(h)
        h = layers.mixed_6.conv(h)                                             # (N, 192, 17, 17)
        return h[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)         # (N, 17*17*7) like ADM

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> ImageFeatures:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
        pool = self.net(x, return_features=True)                               # (N, 2048)
        probs = self.net(x, no_output_bias=True)                               # (N, 1008) softmax
        spatial = self._spatial(x.float())
        return ImageFeatures(_np(pool), _np(spatial), _np(probs))


def _remembered_digest(path: Path) -> str | None:
    side = path.with_name(path.name + ".sha256")
    try:
        return side.read_text().split()[0] if side.is_file() else None
    except (OSError, IndexError):
        return None


def _remember_digest(path: Path, digest: str) -> None:
    from stepcache.io import OutputError, atomic_write

    side = path.with_name(path.name + ".sha256")
    if not side.is_file():
        try:
            atomic_write(side, lambda f: f.write(f"{digest}  {path.name}\n".encode()))
        except OutputError:
            pass  # a read-only cache folder: the file is still verified by structure on every load


def _load_inception(path: Path, device, expected: str | None):
    """(TorchScript network, SHA-256 of the file): the digest must equal ``expected`` when one is known,
    and the network must give ADM's 2048 pool features and 1008 class probabilities."""
    from stepcache.io import file_sha256

    digest = file_sha256(path)
    if expected and digest != expected.lower():
        raise CheckpointError(f"{path} fails its checksum (SHA-256 {digest[:16]}..., expected {expected[:16]}...); "
                              "delete it to download it again.")
    try:
        net = torch.jit.load(str(path), map_location=device).eval()
        with torch.no_grad():
            probe = torch.zeros(1, 3, 8, 8, dtype=torch.uint8, device=device)  # resized to 299 inside
            sizes = (net(probe, return_features=True).shape, net(probe, no_output_bias=True).shape)
    except Exception as exc:
        raise CheckpointError(f"{path} is not the TorchScript Inception network ({type(exc).__name__}).") from None
    if sizes != ((1, 2048), (1, 1008)):
        raise CheckpointError(f"{path} is not the FID Inception network (outputs {sizes[0]}, {sizes[1]}).")
    return net, digest


class DigitFeatures:
    """The embedded model's digit classifier: pool = ``.features``, probs = softmax of ``.logits``."""

    name = "digits"

    def __init__(self, device: str | torch.device = "cpu"):
        try:
            from stepcache.eval.digits import load_digit_classifier
        except ModuleNotFoundError as exc:
            raise CheckpointError(f"The digit classifier is not available ({exc.name} is missing).") from None
        self.device = torch.device(device)
        net = load_digit_classifier()  # shared and cached on the CPU: a copy goes to another device
        self.net = net if self.device.type == "cpu" else copy.deepcopy(net).to(self.device)

    @staticmethod
    def to_input(images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float (N, 1, H, W) in [-1, 1] (the channels are equal for grey samples)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).float().mean(dim=3, keepdim=True)  # (N, H, W, 1)
        return (x / 127.5 - 1.0).permute(0, 3, 1, 2)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> ImageFeatures:
        x = self.to_input(images).to(self.device)
        feats = self.net.features(x)                                           # (N, F)
        logits = self.net.logits(x)                                            # (N, 10)
        return ImageFeatures(_np(feats), None, _np(torch.softmax(logits.double(), dim=1)))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def load_extractor(kind: str, inception_path: str | Path | None = None, device: str = "cpu"):
    """``"inception"`` or ``"digits"`` -> a callable uint8 (N, H, W, 3) -> :class:`ImageFeatures`."""
    if kind == "inception":
        return InceptionFeatures(inception_path, device=device)
    if kind == "digits":
        return DigitFeatures(device=device)
    raise ConfigError(f"Unknown feature network {kind!r}; choose 'inception' or 'digits'.")


def extract_features(images: np.ndarray, extractor, batch_size: int = 64) -> ImageFeatures:
    """Run ``extractor`` over uint8 images (N, H, W, 3) in batches and concatenate (float64)."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ConfigError(f"images must be uint8 of shape (N, H, W, 3), got {images.dtype} {tuple(images.shape)}.")
    parts = [extractor(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    if not parts:
        raise ConfigError("There are no images to compute features of.")

    def cat(field):
        arrays = [getattr(p, field) for p in parts]
        return None if arrays[0] is None else np.concatenate(arrays, axis=0)

    return ImageFeatures(cat("pool"), cat("spatial"), cat("probs"))
