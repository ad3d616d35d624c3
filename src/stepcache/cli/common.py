"""Shared pieces of the subcommands: model loading, policy options, image output, run records."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from stepcache.bench.records import environment  # noqa: F401 - one description of the machine for every record
from stepcache.errors import CheckpointError, ConfigError
# the file utilities live in stepcache.io; the subcommands (and older callers) import them from here too
from stepcache.io import atomic_write, check_output_dir, save_grid, to_uint8, write_json  # noqa: F401
from stepcache.cli.policy_flags import add_cache_options, build_policy, chosen_settings  # noqa: F401 - re-exported
from stepcache.sampling.precision import synchronize  # noqa: F401 - re-exported for the subcommands



# ---------------------------------------------------------------- argument types
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


SEED_LIMIT = 2**63  # torch.manual_seed and torch.Generator take seeds below 2**64; sums of seeds stay below it


def seed_int(text: str) -> int:
    """A seed in 0..2**63-1 (torch's generators reject larger ones with a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must lie in 0..2**63-1, got {value}")
    return value


def finite_float(text: str) -> float:
    """A finite number: 'nan' and 'inf' parse as floats but mean nothing as a guidance scale or threshold."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def add_sampling_options(parser: argparse.ArgumentParser, *, steps: int, sampler: str, cfg: float,
                         item: str) -> None:
    """--num-sampling-steps, --sampler, --cfg-scale, --seed (of ``item`` 0; item k uses seed + k)."""
    parser.add_argument("--num-sampling-steps", type=positive_int, default=steps, help="sampling steps")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default=sampler, help="sampler")
    parser.add_argument("--cfg-scale", type=finite_float, default=cfg, help="guidance scale, 1 = off")
    parser.add_argument("--seed", type=seed_int, default=0, help=f"seed of {item} 0 ({item} k uses seed + k)")


def check_guidance_and_interval(args) -> None:
    """One sentence for a guidance scale that is not a finite number >= 1, or for bad caching settings."""
    if not math.isfinite(args.cfg_scale) or args.cfg_scale < 1:
        raise ConfigError(f"--cfg-scale must be >= 1, got {args.cfg_scale}.")
    chosen_settings(args)


# ---------------------------------------------------------------- device and dtype
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_device_options(parser: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    """--device (default: CUDA when present, else the CPU) and --dtype fp32|bf16|fp16 (default fp32)."""
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    if dtype:
        parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                            help="model weights and activations; the sampler stays float32 (default: %(default)s)")


def resolve_device(text: str | None) -> torch.device:
    """The device ``--device`` names, checked against this machine; one sentence when it cannot be used."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {text!r}.") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {text!r}.")
    if not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine; use --device cpu.")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {text} does not exist: this machine has {torch.cuda.device_count()} "
                          "CUDA device(s).")
    return device


def placement(args) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of ``--device`` / ``--dtype`` (fp32 where the subcommand has no --dtype)."""
    return resolve_device(getattr(args, "device", None)), DTYPES[getattr(args, "dtype", None) or "fp32"]


def place(model: torch.nn.Module, args) -> torch.nn.Module:
    """The model moved to ``--device`` and cast to ``--dtype``."""
    device, dtype = placement(args)
    return model.to(device=device, dtype=dtype)


# ---------------------------------------------------------------- models
def load_model(args):
    """(model, is_latent). ``--model embedded`` (pixel space), a preset with --ckpt/--random-weights, or official."""
    from stepcache.cli import uvit
    from stepcache.models.dit import DiT, parse_preset

    if uvit.is_uvit(args.model):
        return uvit.load(args)
    if args.model == "embedded":
        if args.ckpt:
            raise ConfigError("--ckpt cannot be combined with --model embedded.")
        from stepcache.models.embedded import load_embedded

        return load_embedded(), False
    parse_preset(args.model)
    if args.image_size % 8:
        raise ConfigError(f"--image-size must be a multiple of 8 (the VAE's factor), got {args.image_size}.")
    latent = args.image_size // 8
    if args.ckpt:
        model = DiT.from_pretrained(args.ckpt, input_size=latent)
        if model.input_size != latent:
            raise ConfigError(f"the checkpoint is for {model.input_size * 8}px images, not --image-size "
                              f"{args.image_size}.")
        return model.eval(), True
    if args.random_weights:
        model = DiT.from_preset(args.model, input_size=latent)
        randomize_(model, args.seed)
        return model.eval(), True
    if args.model != "DiT-XL/2" or args.image_size not in (256, 512):
        raise ConfigError(f"no official checkpoint for {args.model} at {args.image_size}px; pass --ckpt FILE "
                          "(or --random-weights).")
    return DiT.from_pretrained(f"DiT-XL-2-{args.image_size}x{args.image_size}.pt").eval(), True


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere but pos_embed (adaLN-Zero would otherwise make caching a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.01))


# ---------------------------------------------------------------- outputs
def decode_latents(latents: torch.Tensor, vae: str):
    """SD VAE decode through diffusers when its weights are available locally or online; else None."""
    try:
        from diffusers.models import AutoencoderKL
    except Exception:
        return None, "diffusers is not installed (pip install 'stepcache[diffusers]')"
    import warnings

    repo = f"stabilityai/sd-vae-ft-{vae}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoencoderKL.from_pretrained(repo, local_files_only=True).eval()
    except Exception:
        if not hub_reachable():
            return None, f"the VAE {repo} is not cached locally and the Hugging Face Hub cannot be reached"
        try:
            model = AutoencoderKL.from_pretrained(repo).eval()
        except Exception as exc:
            return None, f"the VAE {repo} could not be loaded ({type(exc).__name__}: {exc})"
    with torch.no_grad():
        return model.decode(latents / 0.18215).sample, None


def hub_reachable(host: str | None = None, timeout: float = 3.0) -> bool:
    """A quick TCP check of the Hub ($HF_ENDPOINT, else huggingface.co), so offline machines fail at once instead
    of after minutes of retries; False under HF_HUB_OFFLINE=1."""
    import socket
    from urllib.parse import urlparse

    from stepcache.downloads import hub_endpoint, hub_host, hub_offline

    if hub_offline():
        return False
    port = urlparse(hub_endpoint()).port or (80 if hub_endpoint().startswith("http:") else 443)
    try:
        socket.create_connection((host or hub_host(), port), timeout=timeout).close()
        return True
    except OSError:
        return False


def require_file(path: str, what: str) -> Path:
    """``path`` as a Path when it is an existing file; else one sentence saying what it is instead."""
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a file.")
    if not p.is_file():
        raise CheckpointError(f"{what} {path} does not exist.")
    return p
