"""Resumable multi-process sampling for FID runs, after DiT's ``sample_ddp.py`` (Peebles & Xie, 2023).

Differences from DiT's script, all in service of reproducible 50k-sample evaluations:

- **Per-image seeds** (EDM's per-seed generators, Karras et al. 2022): sample ``k`` uses a generator seeded
  from ``(global_seed, k)`` for its class label, its initial noise and its per-step noise, so image ``k``
  does not depend on the rank, on the number of processes or on which images were sampled before it.
  ``global_seed`` is one 32-bit word (0..2**32-1); larger seeds are refused rather than aliased to smaller ones.
  Each rank still seeds its global RNG with DiT's ``global_seed * world_size + rank``.
- **Fixed batches**: batch ``j`` always holds samples ``[j*B, (j+1)*B)``; ranks take the pending batches
  round-robin. A batch is recomputed whole when any of its PNGs is missing or bad, so its bits never depend on
  what was done before (matmul results can depend on the batch's rows, so batches never change shape).
- **Resume**: PNGs are written atomically (temporary file + rename) as ``DIR/samples/{k:06d}.png``; a rerun
  of the same command decodes every existing PNG (a truncated, empty or wrong-sized one counts as missing)
  and redoes the batches with a missing one. ``DIR/samples.npz`` (``arr_0``, uint8 (N, H, W, 3)) is built
  from the PNGs at the end, so a killed-and-resumed run ends with exactly the npz of an uninterrupted one.
- A JSON record ``DIR/sample_ddp.json`` holds the configuration — every option that changes a pixel, and the
  weights' content hash — written before the first sample. A rerun with another configuration, or a folder
  holding samples but no record, is refused naming the option that differs; the record then gains the
  timings of every run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from stepcache.errors import CheckpointError, ConfigError, StepcacheError
from stepcache.io import png_ok, read_png, save_npz, write_json
from stepcache.io import write_png as _write_png

__all__ = ["DDPSampleConfig", "image_seed", "sample_batch", "pending_batches", "assemble_npz", "run_ddp_sampling",
           "init_distributed", "prepare_record"]

RECORD = "sample_ddp.json"
SEED_LIMIT = 2**32  # the global seed is mixed as one 32-bit word: larger seeds would alias smaller ones

# The command-line option behind each config field, so that a refusal can name what differs.
OPTION = {"num_samples": "--num-samples", "batch_size": "--per-proc-batch-size", "global_seed": "--global-seed",
          "num_steps": "--steps", "sampler": "--sampler", "cfg_scale": "--cfg-scale", "model": "--model",
          "policy": "the caching options (--cache ...)", "guide_channels": "--guide-all-channels",
          "image_size": "--image-size", "vae": "--vae", "weights": "the weights (--ckpt / --random-weights)",
          "dtype": "--dtype"}


@dataclass(frozen=True)
class DDPSampleConfig:
    """Everything that decides the pixels of sample k (a resumed run must use the same values).

    ``weights`` identifies the model's weights by content (a checkpoint's SHA-256, or the seed of random
    weights), not by file name; ``image_size`` is the side of the written images in pixels (checked on
    resume); ``vae`` the decoder of a latent model.
    """

    num_samples: int
    batch_size: int
    global_seed: int
    num_steps: int
    sampler: str
    cfg_scale: float
    model: str
    policy: dict
    guide_channels: str | None = None
    image_size: int | None = None
    vae: str | None = None
    weights: dict = field(default_factory=dict)
    dtype: str = "fp32"  # of the model (--dtype); the sampler keeps float32 state

    def __post_init__(self) -> None:
        if isinstance(self.global_seed, bool) or not 0 <= int(self.global_seed) < SEED_LIMIT:
            raise ConfigError(f"--global-seed must lie in 0..2**32-1, got {self.global_seed}.")
        if not np.isfinite(self.cfg_scale) or self.cfg_scale < 1:
            raise ConfigError(f"--cfg-scale must be a finite number >= 1, got {self.cfg_scale}.")


def image_seed(global_seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a run seeded ``global_seed`` (numpy SeedSequence mixing)."""
    if not 0 <= int(global_seed) < SEED_LIMIT:
        raise ConfigError(f"The global seed must lie in 0..2**32-1, got {global_seed}.")
    state = np.random.SeedSequence([int(global_seed), int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _generators(global_seed: int, indices: range, device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(image_seed(global_seed, k)) for k in indices]


def sample_batch(model, indices: range, cfg: DDPSampleConfig, device: torch.device, policy=None):
    """Latents or pixels (n, C, H, W) and labels (n,) of samples ``indices``, each from its own generator."""
    from stepcache.sampling.sample import sample

    gens = _generators(cfg.global_seed, indices, device)
    labels = torch.stack([torch.randint(model.num_classes, (), generator=g, device=device) for g in gens])  # (n,)
    shape = (model.in_channels, model.input_size, model.input_size)
    noise = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])  # (n, C, H, W)
    out = sample(model, noise, labels, num_steps=cfg.num_steps, sampler=cfg.sampler,
                 cfg_scale=cfg.cfg_scale, policy=policy, guide_channels=cfg.guide_channels,
                 generator=gens)
    return out, labels


def batches(num_samples: int, batch_size: int) -> list[range]:
    """The fixed batches: batch j = samples [j*B, min((j+1)*B, N))."""
    return [range(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]


def png_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / "samples" / f"{index:06d}.png"


def _size(image_size: int | None) -> tuple[int, int] | None:
    return None if image_size is None else (image_size, image_size)


def pending_batches(out_dir: Path, num_samples: int, batch_size: int, image_size: int | None = None,
                    rank: int = 0, world: int = 1) -> list[int]:
    """Indices of the batches with a PNG that is missing or bad (does not decode, or not ``image_size``).

    Every PNG is decoded, since a kill, a full disk or a copy can leave a file that exists but is not an
    image; with ``world`` > 1 each rank checks its share (batches ``j % world == rank``)."""
    size = _size(image_size)
    return [j for j, idx in enumerate(batches(num_samples, batch_size))
            if j % world == rank and not all(png_ok(png_path(out_dir, k), size) for k in idx)]


def write_png(path: Path, image: np.ndarray) -> None:
    """Atomically write one uint8 (H, W, 3) image."""
    _write_png(path, image)


def assemble_npz(out_dir: Path, num_samples: int, image_size: int | None = None) -> Path:
    """Read PNGs 0..N-1 into ``DIR/samples.npz`` (``arr_0``, uint8 (N, H, W, 3)), written atomically."""
    missing = [k for k in range(num_samples) if not png_path(out_dir, k).is_file()]
    if missing:
        raise ConfigError(f"{len(missing)} of {num_samples} samples are missing in {out_dir}/samples "
                          f"(first: {missing[0]}); rerun the same command to finish them.")
    size = _size(image_size)
    try:
        arr = np.stack([read_png(png_path(out_dir, k), size) for k in range(num_samples)])  # (N, H, W, 3)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} Rerun the same command to redo it.") from None
    except ValueError:
        raise CheckpointError(f"The PNGs in {out_dir}/samples differ in size; rerun the same command.") from None
    return save_npz(Path(out_dir) / "samples.npz", arr_0=arr)


def init_distributed(device: torch.device | None = None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device): under torchrun, init NCCL (GPU) or gloo (CPU); else a single process.

    ``device``: the CPU, or a CUDA device (a single process uses its index; under torchrun each rank takes
    its LOCAL_RANK's GPU); by default CUDA when available."""
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
    else:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda and world == 1 and device is not None and torch.device(device).index is not None:
        device = torch.device(device)
        torch.cuda.set_device(device)
    elif use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _differing(old: dict, new: dict) -> str | None:
    """The first config field whose value differs, as a phrase naming its command-line option."""
    for key in list(new) + [k for k in old if k not in new]:
        if old.get(key) != new.get(key):
            was, now = old.get(key, "unrecorded"), new.get(key, "unset")
            if key in ("policy", "weights"):
                return f"{OPTION.get(key, key)} differ"
            return f"{OPTION.get(key, key)} was {was!r}, now {now!r}"
    return None


def _has_samples(out_dir: Path) -> bool:
    folder = Path(out_dir) / "samples"
    return (Path(out_dir) / "samples.npz").exists() or (folder.is_dir() and any(folder.glob("*.png")))


def prepare_record(out_dir: Path, cfg: DDPSampleConfig) -> dict:
    """The folder's record, written now when new; refuses a folder sampled with another configuration.

    Runs before the first sample, so a killed run always leaves the record of what its PNGs are, and a
    rerun with other options (or a folder of PNGs from elsewhere, without a record) is refused instead of
    mixing two configurations in one npz.
    """
    out_dir = Path(out_dir)
    path = out_dir / RECORD
    config = json.loads(json.dumps(asdict(cfg)))
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a sample_ddp record; use a fresh --out-dir.")
    if not path.exists():
        if _has_samples(out_dir):
            raise ConfigError(f"{out_dir} holds samples but no {RECORD} saying how they were made; use a fresh "
                              "--out-dir.")
        record = {"config": config, "runs": []}
        write_json(path, record)
        return record
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{path} is not a readable sample_ddp record; use a fresh --out-dir.") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict) \
            or not isinstance(record.get("runs", []), list):
        raise ConfigError(f"{path} is not a sample_ddp record; use a fresh --out-dir.")
    why = _differing({"dtype": "fp32", **record["config"]}, config)  # records before --dtype were float32
    if why:
        raise ConfigError(f"{out_dir} holds samples of another configuration ({why}; see {path}); use a fresh "
                          "--out-dir or the same options as before.")
    record.setdefault("runs", [])
    return record


def _clean_partial_writes(out_dir: Path) -> None:
    """Remove temporary files that a killed atomic write left in ``DIR/samples``."""
    folder = Path(out_dir) / "samples"
    if folder.is_dir():
        for tmp in folder.glob(".*.png.*.tmp"):
            tmp.unlink(missing_ok=True)


def _broadcast(obj, rank: int, world: int):
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _on_rank0(fn, rank: int, world: int):
    """``fn()`` on rank 0, its result (or its one-sentence error, raised again) on every rank.

    Without this a refusal on rank 0 would leave the other ranks to die on a closed connection."""
    outcome = None
    if rank == 0:
        try:
            outcome = ("ok", fn())
        except StepcacheError as exc:
            outcome = ("error", type(exc), str(exc))
    outcome = _broadcast(outcome, rank, world)
    if outcome[0] == "error":
        raise outcome[1](outcome[2])
    return outcome[1]


def _gather_pending(out_dir: Path, cfg: DDPSampleConfig, rank: int, world: int) -> list[int]:
    """Batches to (re)do, found by every rank decoding its share of the existing PNGs."""
    mine = pending_batches(out_dir, cfg.num_samples, cfg.batch_size, cfg.image_size, rank, world)
    if world == 1:
        return mine
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return sorted(j for part in parts for j in part)


def run_ddp_sampling(model, cfg: DDPSampleConfig, out_dir: Path, to_uint8: Callable, policy=None,
                     progress: bool = True, extra_record: dict | None = None,
                     device: torch.device | None = None) -> dict:
    """Sample the pending batches on every rank, then (rank 0) write ``samples.npz`` and the JSON record.

    ``to_uint8`` maps the sampler's output (n, C, H, W) to uint8 images (n, H, W, 3) (decode latents there).
    Returns this run's timing record (on every rank). ``device``: see :func:`init_distributed`.
    """
    rank, world, device = init_distributed(device)
    torch.manual_seed(cfg.global_seed * world + rank)  # DiT's per-rank seed (nothing below draws from it)
    out_dir = Path(out_dir)

    def prepare():
        record = prepare_record(out_dir, cfg)
        _clean_partial_writes(out_dir)
        return record

    record = _on_rank0(prepare, rank, world)
    pending = _gather_pending(out_dir, cfg, rank, world)
    mine = pending[rank::world]
    all_batches = batches(cfg.num_samples, cfg.batch_size)
    model = model.to(device)
    start = time.perf_counter()
    done = _sample_batches(model, [all_batches[j] for j in mine], cfg, device, out_dir, to_uint8, policy,
                           progress and rank == 0)
    seconds = time.perf_counter() - start
    counts = torch.tensor([done, seconds], dtype=torch.float64, device=device)  # NCCL needs device tensors
    gathered = [counts]
    if world > 1:
        gathered = [torch.zeros_like(counts) for _ in range(world)]
        dist.all_gather(gathered, counts)
    gathered = [g.cpu() for g in gathered]
    run = {"world_size": world, "device": str(device), "threads_per_process": torch.get_num_threads(),
           "batches_sampled": len(pending), "samples_sampled": int(sum(float(g[0]) for g in gathered)),
           "samples_skipped": cfg.num_samples - int(sum(float(g[0]) for g in gathered)),
           "rank_seconds": [float(g[1]) for g in gathered], **(extra_record or {})}

    def finish():
        npz_start = time.perf_counter()
        npz = assemble_npz(out_dir, cfg.num_samples, cfg.image_size)
        wall = max(run["rank_seconds"])
        run.update(sampling_seconds=wall, npz_seconds=time.perf_counter() - npz_start, npz=str(npz),
                   samples_per_second=run["samples_sampled"] / wall if wall > 0 else None)
        record["runs"].append(run)
        write_json(out_dir / RECORD, record)

    _on_rank0(finish, rank, world)
    return run


def _sample_batches(model, todo: list[range], cfg: DDPSampleConfig, device, out_dir: Path, to_uint8, policy,
                    progress: bool) -> int:
    """Sample and write the given batches; returns the number of samples produced."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(b) for b in todo), desc="sample-ddp (rank 0)", unit="img")
    done = 0
    for idx in todo:
        out, _ = sample_batch(model, idx, cfg, device, policy)
        images = to_uint8(out)                                   # (n, H, W, 3) uint8
        if cfg.image_size is not None and images.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ConfigError(f"The decoded images are {images.shape[1]}x{images.shape[2]} pixels, not the "
                              f"recorded {cfg.image_size}x{cfg.image_size}.")
        for k, img in zip(idx, images):
            write_png(png_path(out_dir, k), img)
        done += len(idx)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return done
