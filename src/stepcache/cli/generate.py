"""``stepcache generate``: run a diffusers pipeline (PixArt, SD3, FLUX, DiT) with a caching policy.

    stepcache generate --pipeline PixArt-alpha/PixArt-XL-2-512x512 --prompt "a red fox" --cache fora:interval=3 \\
        --num-inference-steps 20 --dtype bf16 --summary

Loads the pipeline with ``DiffusionPipeline.from_pretrained`` (a local folder or a hub id), applies the
policy to ``pipe.transformer`` with ``stepcache.apply`` (the diffusers habit), runs it and writes one PNG
per image and a JSON record (the resolved policy, executed and uncached MACs, wall time, seeds, versions,
device, dtype). Image k uses seed + k. With --uncached-too the same images are also made without cache,
and the record gains the measured speedup and the PSNR against them.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import torch

from stepcache.cli.common import (add_cache_options, add_device_options, build_policy, check_output_dir,
                                  environment, finite_float, hub_reachable, placement, positive_int, seed_int,
                                  synchronize, to_uint8, write_json)
from stepcache.errors import CheckpointError, ConfigError, MissingDependencyError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="run a diffusers pipeline (PixArt, SD3, FLUX, DiT) with caching",
                       description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", required=True, metavar="ID_OR_FOLDER",
                   help="a diffusers pipeline: a Hugging Face hub id or a local folder (save_pretrained)")
    p.add_argument("--num-inference-steps", dest="num_sampling_steps", type=positive_int, default=20, metavar="N",
                   help="denoising steps (default: %(default)s)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of image 0 (image k uses seed + k)")
    # one list in command-line order: image k is the k-th --prompt or --class-label
    p.add_argument("--prompt", dest="items", action="append", default=[], metavar="TEXT",
                   help="a prompt (repeat for more images); for DiT pipelines an ImageNet class name")
    p.add_argument("--class-label", dest="items", type=int, action="append", metavar="N",
                   help="a DiT class id (repeat for more images)")
    p.add_argument("--guidance-scale", type=finite_float, default=None,
                   help="guidance scale (default: the pipeline's own)")
    p.add_argument("--height", type=positive_int, default=None, help="image height (default: the pipeline's)")
    p.add_argument("--width", type=positive_int, default=None, help="image width (default: the pipeline's)")
    p.add_argument("--summary", action="store_true", help="print the policy's summary table after the run")
    p.add_argument("--uncached-too", action="store_true",
                   help="also run without cache: measured speedup and PSNR vs the uncached images")
    p.add_argument("--out-dir", "--out", dest="out_dir", type=Path, default=Path("samples"),
                   help="folder for the PNGs and the JSON record (default: %(default)s)")
    add_device_options(p)
    add_cache_options(p)
    p.set_defaults(func=run)


# ---------------------------------------------------------------- loading
def _is_path(text: str) -> bool:
    """A folder path rather than a hub id ("org/name"): absolute, relative with ./ or ~, or deeper than one /."""
    return text.startswith((os.sep, ".", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text


def load_pipeline(source: str, dtype: torch.dtype, device: torch.device):
    """``DiffusionPipeline.from_pretrained(source)`` in ``dtype`` on ``device``; a missing folder, an
    unreachable hub or a foreign folder end in one sentence."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise MissingDependencyError("generate needs diffusers and transformers "
                                     "(pip install 'stepcache[diffusers]').") from None
    path = Path(source).expanduser()
    if path.exists() or _is_path(source):
        if not path.is_dir():
            raise CheckpointError(f"Pipeline folder {source} does not exist.")
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{source} is not a diffusers pipeline folder (no model_index.json; "
                                  "write one with pipe.save_pretrained).")
        pipe = _from_pretrained(DiffusionPipeline, str(path), dtype, source)
    else:
        try:
            pipe = _from_pretrained(DiffusionPipeline, source, dtype, source, local_files_only=True)
        except CheckpointError:
            if not hub_reachable():
                offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
                why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
                raise CheckpointError(
                    f"Pipeline {source} is not in the Hugging Face cache ({_hub_cache()}) and {why}; download it "
                    "once online (unset HF_HUB_OFFLINE) or pass a local folder to --pipeline.") from None
            pipe = _from_pretrained(DiffusionPipeline, source, dtype, source)
    from stepcache.sampling.pipelines import family_of

    family_of(pipe)  # an unsupported pipeline class is refused before anything runs
    return pipe.to(device)


def _from_pretrained(cls, where: str, dtype, source: str, **kw):
    """from_pretrained without the per-component loading bars (a download still shows its own)."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - a DiT pipeline loads without transformers
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.from_pretrained(where, torch_dtype=dtype, **kw)
    except (OSError, ValueError, EnvironmentError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise CheckpointError(f"Could not load the pipeline {source}: {first}.") from None


def _hub_cache() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return str(HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - diffusers depends on huggingface_hub
        return "the Hugging Face cache"


# ---------------------------------------------------------------- the run
def _items(args) -> list:
    items = list(args.items)
    if not items:
        raise ConfigError("Give at least one --prompt (or, for a DiT pipeline, --class-label N).")
    return items


def timed(pipe, request, policy, device):
    """(images, stats or None, seconds, summary text) of one run; ``policy`` None runs the plain pipeline."""
    import stepcache
    from stepcache.sampling.pipelines import run_pipeline

    handle = stepcache.apply(pipe.transformer, policy) if policy is not None else None
    try:
        synchronize(device)
        start = time.perf_counter()
        images = run_pipeline(pipe, request)
        synchronize(device)
        seconds = time.perf_counter() - start
        if handle is None:
            return images, None, seconds, ""
        return images, handle.stats(), seconds, stepcache.summary(pipe.transformer)
    finally:
        if handle is not None:
            handle.remove()


def run(args) -> int:
    """Everything that can be refused is refused before the pipeline runs: options, output folder,
    caching flags, the pipeline itself, then the policy against its transformer and scheduler."""
    import stepcache
    from stepcache.eval.fidelity import psnr
    from stepcache.io import write_png
    from stepcache.policy_file import model_identity
    from stepcache.sampling.pipelines import Request, describe, outputs_are_images

    device, dtype = placement(args)
    items = _items(args)
    check_output_dir(args.out_dir)
    args.sampler = None  # not known before the pipeline is loaded: a --policy file's scheduler is checked then
    build_policy(args)  # bad caching options fail before the pipeline is loaded
    pipe = load_pipeline(args.pipeline, dtype, device)
    pipe.set_progress_bar_config(disable=True)
    info = describe(pipe)
    args.sampler = info["scheduler"]
    # a policy file is checked against the whole pipeline (scheduler too); an L2C router against the transformer
    policy = build_policy(args, model=pipe if args.policy is not None else pipe.transformer) or stepcache.NoCache()
    request = Request(tuple(items), tuple(args.seed + k for k in range(len(items))), args.num_sampling_steps,
                      args.guidance_scale, args.height, args.width)

    baseline = None
    if args.uncached_too:  # a two-step warm-up first, so the first timed run does not carry the start-up costs
        from dataclasses import replace

        timed(pipe, replace(request, num_steps=2), None, device)
        baseline = timed(pipe, request, None, device)
    images, stats, seconds, table = timed(pipe, request, policy, device)
    record = {"command": "generate",
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                         if k not in ("func", "_cache_flags") and not (k.startswith("cache_opt_") and v is None)},
              "pipeline": {"source": args.pipeline, **info,
                           "transformer_identity": {k: v for k, v in model_identity(pipe.transformer).items()
                                                    if k != "config"}},
              "policy": policy.to_dict(), "items": items, "seeds": list(request.seeds),
              "environment": {**environment(), "diffusers": _version("diffusers")}, "device": str(device),
              "dtype": args.dtype, "result": {"seconds": seconds, **stats.as_dict()}}
    if baseline is not None:
        record["baseline"] = {"seconds": baseline[2]}
        record["result"]["measured_speedup"] = baseline[2] / seconds
        scale = 2.0 if outputs_are_images(pipe) else 1.0  # [0, 1] images to the [-1, 1] range of every PSNR here
        record["result"]["psnr_db_vs_uncached"] = [float(v) for v in psnr(images * scale, baseline[0] * scale)]

    method = policy.method.replace("/", "-")
    stem = f"{info['family']}-{args.num_sampling_steps}steps-{method}-seed{args.seed}"
    if outputs_are_images(pipe):
        pixels = to_uint8(images * 2 - 1)  # (N, H, W, 3)
        record["images"] = [str(write_png(args.out_dir / f"{stem}-{k}.png", im)) for k, im in enumerate(pixels)]
    else:
        from stepcache.io import atomic_write

        path = args.out_dir / f"{stem}.latents.pt"
        atomic_write(path, lambda f: torch.save({"latents": images, "items": items}, f))
        record["latents"] = str(path)
    write_json(args.out_dir / f"{stem}.json", record)
    print(f"Saved {len(items)} {'image(s)' if 'images' in record else 'latent(s)'} and the record "
          f"{args.out_dir / (stem + '.json')}")
    line = f"{policy.method}: {seconds:.2f} s, {stats.summary()}"
    if baseline is not None:
        res = record["result"]
        line += (f"; measured speedup {res['measured_speedup']:.2f}x vs uncached {baseline[2]:.2f} s, PSNR "
                 f"{min(res['psnr_db_vs_uncached']):.2f} dB (worst image)")
    print(line)
    if args.summary:
        print(table)
    return 0


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
