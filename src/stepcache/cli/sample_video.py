"""``stepcache sample --model STDiT3-XL/2``: OpenSora v1.2 text-to-video latents, optionally cached.

Text comes from ``--prompt-embeds`` (a torch file with ``y`` (n, 1, L, 4096) and ``mask`` (n, L)) or from
``--prompt`` through T5-XXL (transformers; needs the weights). The latents are always saved. OpenSora's own
VAE (SDXL's 2-D VAE plus its temporal VAE) is not available offline: with ``--vae`` (a diffusers
``AutoencoderKL`` folder or hub id) every latent frame is decoded by that 2-D VAE, the documented substitute
(:mod:`stepcache.cli.video_vae`), and written as an mp4 (or GIF, ``--video-format``) through imageio; without it
a note says how to decode them. With ``imageio`` installed a preview GIF of latent channels 0-2 is written too.
``--dtype bf16`` runs the model in bfloat16 as the official inference does (noise and sizes in bf16, the
schedule and the Euler update in float32: the latents become float32 after the first update).
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
    g.add_argument("--video-format", choices=("mp4", "gif"), default="mp4",
                   help="container of the decoded video with --vae (default: %(default)s)")
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
    device, dtype = placement(args)  # a device this machine lacks fails before the model is loaded
    if dtype == torch.float16:
        raise ConfigError("--dtype fp16 is not supported for STDiT3 video models (the official run is bf16); "
                          "use --dtype bf16 or fp32.")
    policy = build_policy(args)
    if args.random_weights:
        model = STDiT3.from_preset(args.model)
        _randomize(model, args.seed)
    else:
        model = load_stdit3(args.ckpt or OFFICIAL_REPO, args.model)
    model = model.to(device=device, dtype=dtype)
    y, mask = _text(args, model)
    y, mask = y.to(device=device, dtype=dtype), mask.to(device)
    height, width = RESOLUTIONS[args.resolution]
    n = y.shape[0]
    frames = args.num_frames
    if frames < 1:
        raise ConfigError(f"--num-frames must be >= 1, got {frames}.")
    latent_frames = frames // 17 * 5 + -(-(frames % 17) // 4)  # OpenSora VAE: chunks of 17 -> 5, rest / 4 up
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(n, model.in_channels, latent_frames, height // 8, width // 8, generator=g)  # VAE: floor
    noise = noise.to(device=device, dtype=dtype)  # drawn on the CPU in float32: the same noise on every device
    # sizes as tensors of the model dtype, as the official bf16 run builds them (854 is 856 in bf16)
    sizes = {k: torch.tensor([float(v)] * n, device=device, dtype=dtype)
             for k, v in (("height", height), ("width", width), ("num_frames", frames), ("fps", args.fps))}
    synchronize(device)
    start = time.perf_counter()
    latents, stats = stepcache.sample(model, noise, y, num_steps=args.num_sampling_steps, sampler="rflow",
                                      cfg_scale=args.cfg_scale, policy=policy or stepcache.NoCache(), mask=mask,
                                      progress=True, return_stats=True, **sizes)
    synchronize(device)
    seconds = time.perf_counter() - start
    latents = latents.float().cpu()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"stdit3-{args.resolution}-{frames}f-seed{args.seed}"
    torch.save({"latents": latents, "height": height, "width": width, "num_frames": frames, "fps": args.fps},
               f"{stem}.pt")
    videos = _decode(args, latents, stem, device)
    if videos:
        note = (f"latents saved to {stem}.pt; decoded per latent frame by the 2-D VAE {args.vae} (a substitute for "
                f"OpenSora's spatial + temporal VAE): {', '.join(videos)}")
    else:
        note = (f"latents saved to {stem}.pt; no OpenSora VAE (SDXL VAE + temporal VAE) here: decode them with "
                "OpenSora's VideoAutoencoderPipeline (hpcai-tech/OpenSora-VAE-v1.2), or pass --vae (a diffusers "
                "AutoencoderKL) for a per-frame substitute.")
    preview = _preview(latents, f"{stem}-latent-preview.gif", args.fps)
    record = {"command": "sample", "model": args.model, "policy": policy.to_dict() if policy else {"method": "none"},
              "dtype": str(dtype).removeprefix("torch."), "result": {"seconds": seconds, **stats.as_dict()},
              "latents": f"{stem}.pt", "videos": videos, "note": note, "preview": preview,
              "environment": environment()}
    write_json(Path(f"{stem}.json"), record)
    print(note)
    print(stats.summary())
    return 0


def _decode(args, latents: torch.Tensor, stem: Path, device) -> list[str]:
    """With ``--vae``: each sample decoded per latent frame and written as ``{stem}[-k].mp4`` (or .gif)."""
    if args.vae in (None, "ema", "mse"):  # DiT's SD VAE choices: no video VAE given
        return []
    from stepcache.cli.video_vae import decode_per_frame, load_vae
    from stepcache.io import save_video

    vae = load_vae(args.vae, device, torch.float32)
    pixels = decode_per_frame(vae, latents)  # (n, T', H, W, 3) uint8
    paths = []
    for k, video in enumerate(pixels):
        path = f"{stem}{'' if len(pixels) == 1 else f'-{k}'}.{args.video_format}"
        save_video(path, video, fps=args.fps)
        paths.append(path)
    return paths


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
