"""``stepcache sample --model STDiT3-XL/2``: OpenSora v1.2 text-to-video latents, optionally cached.

Text comes from ``--prompt-embeds`` (a torch file with ``y`` (n, 1, L, 4096) and ``mask`` (n, L)) or from
``--prompt`` through T5-XXL (transformers; needs the weights). stepcache has no OpenSora VAE (SDXL's 2-D VAE
plus OpenSora's temporal VAE): the latents are saved with a note on decoding them; with ``imageio`` installed
a preview GIF of latent channels 0-2 is written as well.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from stepcache.errors import ConfigError

# OpenSora v1.2's 9:16 buckets (height, width) in pixels
RESOLUTIONS = {"144p": (144, 256), "240p": (240, 426), "360p": (360, 640), "480p": (480, 854), "720p": (720, 1280)}
# DiT's CLI defaults replaced by OpenSora's when left as they are (None: the ToCa OpenSora variant's own)
VIDEO_DEFAULTS = {"num_sampling_steps": 30, "cfg_scale": 7.0}  # ToCa settings left unset resolve per model


def add_video_options(p) -> None:
    """Video options; call last, so that the parser's defaults (kept for ``run``) are all known."""
    g = p.add_argument_group("video (STDiT3 models)")
    g.add_argument("--prompt", nargs="+", default=None, help="prompts, encoded by T5-XXL (transformers)")
    g.add_argument("--prompt-embeds", type=Path, default=None, help="torch file with T5 features 'y' and 'mask'")
    g.add_argument("--resolution", choices=tuple(RESOLUTIONS), default="240p", help="9:16 (default: %(default)s)")
    g.add_argument("--num-frames", type=int, default=51, help="pixel frames (default: %(default)s)")
    g.add_argument("--fps", type=float, default=24.0, help="(default: %(default)s)")
    p.set_defaults(parser_defaults={a.dest: a.default for a in p._actions})


def is_video_model(name: str) -> bool:
    return name.startswith("STDiT3")


def _text(args, model):
    if args.prompt_embeds is not None:
        try:
            blob = torch.load(args.prompt_embeds, map_location="cpu", weights_only=True)
            y, mask = blob["y"], blob["mask"]
        except FileNotFoundError:
            raise ConfigError(f"No prompt-embeds file at {str(args.prompt_embeds)!r}.") from None
        except Exception:
            raise ConfigError(f"{args.prompt_embeds} must be a torch file with tensors 'y' and 'mask'.") from None
        return y, mask
    if args.prompt:
        from stepcache.models.stdit3_io import encode_prompts

        return encode_prompts(args.prompt, max_length=model.model_max_length)
    if args.random_weights:  # timing runs: random features stand in for the text
        g = torch.Generator().manual_seed(args.seed)
        y = torch.randn(1, 1, model.model_max_length, model.config["caption_channels"], generator=g)
        return y, torch.ones(1, model.model_max_length, dtype=torch.long)
    raise ConfigError("STDiT3 sampling needs --prompt or --prompt-embeds.")


def run(args) -> int:
    import stepcache
    from stepcache.cli.common import build_policy, environment, placement, synchronize, write_json
    from stepcache.models.stdit3 import STDiT3
    from stepcache.models.stdit3_io import OFFICIAL_REPO, load_stdit3

    for name, value in VIDEO_DEFAULTS.items():  # DiT's defaults do not fit OpenSora
        if getattr(args, name) == args.parser_defaults.get(name):
            setattr(args, name, value)
    device, _ = placement(args)  # a device this machine lacks fails before the model is loaded
    if getattr(args, "dtype", "fp32") != "fp32":
        raise ConfigError("--dtype bf16/fp16 is not available for STDiT3 video models yet; use --dtype fp32.")
    policy = build_policy(args)
    if args.random_weights:
        model = STDiT3.from_preset(args.model)
        _randomize(model, args.seed)
    else:
        model = load_stdit3(args.ckpt or OFFICIAL_REPO, args.model)
    model = model.to(device)
    y, mask = _text(args, model)
    y, mask = y.to(device), mask.to(device)
    height, width = RESOLUTIONS[args.resolution]
    n = y.shape[0]
    frames = args.num_frames
    if frames < 1:
        raise ConfigError(f"--num-frames must be >= 1, got {frames}.")
    latent_frames = frames // 17 * 5 + -(-(frames % 17) // 4)  # OpenSora VAE: chunks of 17 -> 5, rest / 4 up
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(n, model.in_channels, latent_frames, height // 8, width // 8, generator=g)  # VAE: floor
    noise = noise.to(device)  # drawn on the CPU: the same noise on every device
    synchronize(device)
    start = time.perf_counter()
    latents, stats = stepcache.sample(model, noise, y, num_steps=args.num_sampling_steps, sampler="rflow",
                                      cfg_scale=args.cfg_scale, policy=policy or stepcache.NoCache(), mask=mask,
                                      height=height, width=width, num_frames=frames, fps=args.fps, progress=True,
                                      return_stats=True)
    synchronize(device)
    seconds = time.perf_counter() - start
    latents = latents.cpu()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"stdit3-{args.resolution}-{frames}f-seed{args.seed}"
    torch.save({"latents": latents, "height": height, "width": width, "num_frames": frames, "fps": args.fps},
               f"{stem}.pt")
    note = (f"latents saved to {stem}.pt; stepcache has no OpenSora VAE (SDXL VAE + temporal VAE): decode them "
            "with OpenSora's VideoAutoencoderPipeline (hpcai-tech/OpenSora-VAE-v1.2).")
    preview = _preview(latents, f"{stem}-latent-preview.gif", args.fps)
    record = {"command": "sample", "model": args.model, "policy": policy.to_dict() if policy else {"method": "none"},
              "result": {"seconds": seconds, **stats.as_dict()}, "latents": f"{stem}.pt", "note": note,
              "preview": preview, "environment": environment()}
    write_json(Path(f"{stem}.json"), record)
    print(note)
    print(stats.summary())
    return 0


def _randomize(model, seed: int) -> None:
    """Random weights for timing runs (zero-initialised output projections too); rope.freqs kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "rope.freqs" and p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)


def _preview(latents: torch.Tensor, path: str, fps: float):
    """A GIF of latent channels 0-2 of the first sample (each scaled to [0, 255]) when imageio is installed."""
    try:
        import imageio.v3 as iio
    except ImportError:
        return None
    x = latents[0, :3]  # (3, T, H, W)
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    frames = ((x - lo) / (hi - lo + 1e-8) * 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
    iio.imwrite(path, frames, duration=1000 / fps, loop=0)
    return path
