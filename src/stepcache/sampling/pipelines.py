"""Calling a diffusers pipeline the same way every time: prompts (or DiT class labels), one seed per image.

``stepcache generate`` and the pipeline tuner both go through :func:`run_pipeline`, so an image of a
tune and an image of ``generate`` with the same prompt, seed, step count and guidance are the same
image. Image k gets its own CPU generator seeded with ``seeds[k]`` (diffusers draws the initial noise
on the CPU from it and moves it: the same noise on every device), so an image does not depend on the
batch it is sampled in.

The four families differ only in how a request is spelt: DiT takes ``class_labels`` (ids, or ImageNet
names through ``pipe.get_label_ids``) and returns numpy; PixArt, SD3 and FLUX take ``prompt`` and return
tensors (latents when the pipeline has no VAE).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stepcache.errors import ConfigError, StepcacheError, UnsupportedModelError

FAMILIES = {"DiTPipeline": "dit", "PixArtAlphaPipeline": "pixart", "PixArtSigmaPipeline": "pixart",
            "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
PIXART_BINNED_SIZES = (32, 64, 128, 256)  # transformer sample sizes PixArt's aspect-ratio bins exist for


def family_of(pipe) -> str:
    """``dit``, ``pixart``, ``sd3`` or ``flux``; another pipeline class raises one sentence naming these."""
    name = type(pipe).__name__
    if name not in FAMILIES:
        raise UnsupportedModelError(f"{name} is not a supported pipeline; supported: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def describe(pipe) -> dict:
    """What a record says about a pipeline: its class, family, scheduler and transformer class."""
    return {"class": type(pipe).__name__, "family": family_of(pipe), "scheduler": type(pipe.scheduler).__name__,
            "transformer": type(pipe.transformer).__name__}


@dataclass(frozen=True)
class Request:
    """One pipeline call: an item per image (a prompt, or a DiT class id or name) and a seed per image."""

    items: tuple
    seeds: tuple
    num_steps: int
    guidance_scale: float | None = None  # None: the pipeline's own default
    height: int | None = None
    width: int | None = None

    def __post_init__(self):
        if not self.items:
            raise ConfigError("Give at least one prompt (or, for DiT, one class label).")
        if len(self.items) != len(self.seeds):
            raise ConfigError(f"One seed per image: {len(self.items)} items but {len(self.seeds)} seeds.")


def class_ids(pipe, items) -> list[int]:
    """DiT's class ids from ints (or their digits) or ImageNet names (``pipe.get_label_ids``), checked against
    the model."""
    n = pipe.transformer.config.num_embeds_ada_norm
    items = [int(x) if isinstance(x, str) and x.strip().isdigit() else x for x in items]  # "207" is a class id
    names = [x for x in items if not isinstance(x, int)]
    ids = dict(zip(names, _label_ids(pipe, names))) if names else {}
    out = [x if isinstance(x, int) else ids[x] for x in items]
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ConfigError(f"class label {bad[0]} is outside this DiT's 0..{n - 1}.")
    return out


def _label_ids(pipe, names) -> list[int]:
    labels = getattr(pipe, "labels", None) or {}
    unknown = [x for x in names if x not in labels]
    if unknown:
        hint = "this pipeline has no label names; use --class-label N" if not labels else \
            f"e.g. {', '.join(sorted(labels)[:3])}"
        raise ConfigError(f"{unknown[0]!r} is not a class name of this DiT pipeline ({hint}).")
    return list(pipe.get_label_ids(list(names)))


def call_kwargs(pipe, request: Request) -> dict:
    """The keyword arguments of ``pipe(...)`` for ``request`` (everything but the generators)."""
    family = family_of(pipe)
    kw = {"num_inference_steps": request.num_steps}
    if request.guidance_scale is not None:
        kw["guidance_scale"] = request.guidance_scale
    if family == "dit":
        if request.height or request.width:
            raise ConfigError("DiT pipelines have a fixed size; --height/--width apply to text-to-image pipelines.")
        return {**kw, "class_labels": class_ids(pipe, request.items), "output_type": "np"}
    if not all(isinstance(x, str) for x in request.items):
        raise ConfigError(f"{type(pipe).__name__} takes text prompts (--prompt), not class labels.")
    kw.update(prompt=list(request.items), output_type="latent" if getattr(pipe, "vae", None) is None else "pt")
    kw.update({k: v for k, v in (("height", request.height), ("width", request.width)) if v})
    if family == "pixart":
        kw["clean_caption"] = False  # the cleaner needs bs4 and ftfy, and only warns without them
        if pipe.transformer.config.sample_size not in PIXART_BINNED_SIZES:
            kw["use_resolution_binning"] = False  # no aspect-ratio bins exist for this size
    return kw


def outputs_are_images(pipe) -> bool:
    """Decoded images in [0, 1] (True) or latents (False: a text-to-image pipeline without a VAE)."""
    return family_of(pipe) == "dit" or getattr(pipe, "vae", None) is not None


def run_pipeline(pipe, request: Request) -> torch.Tensor:
    """Images (N, 3, H, W) float32 in [0, 1] on the CPU, or latents when the pipeline has no VAE."""
    kw = call_kwargs(pipe, request)
    gens = [torch.Generator().manual_seed(int(s)) for s in request.seeds]
    try:
        out = pipe(generator=gens, **kw).images
    except StepcacheError:
        raise
    except ValueError as exc:  # diffusers' own checks (sizes, lengths): its sentence, under our type
        raise ConfigError(f"{type(pipe).__name__} refused the request: {str(exc).strip().splitlines()[0]}") from None
    if isinstance(out, np.ndarray):  # DiT: (N, H, W, 3) in [0, 1]
        out = torch.from_numpy(out).permute(0, 3, 1, 2)  # (N, 3, H, W)
    return out.float().cpu()
