"""Resumable multi-process sampling for FID runs, after DiT's ``sample_ddp.py`` (Peebles & Xie, 2023).

Differences from DiT's script, all in service of reproducible 50k-sample evaluations:

- **Per-image seeds** (EDM's per-seed generators, Karras et al. 2022): sample ``k`` uses a generator seeded
  from ``(global_seed, k)`` for its class label, its initial noise and its per-step noise, so image ``k``
  does not depend on the rank, on the number of processes or on which images were sampled before it.
  Each rank still seeds its global RNG with DiT's ``global_seed * world_size + rank``.
- **Fixed batches**: batch ``j`` always holds samples ``[j*B, (j+1)*B)``; ranks take the pending batches
  round-robin. A batch is recomputed whole when any of its PNGs is missing, so its bits never depend on
  what was done before (matmul results can depend on the batch's rows, so batches never change shape).
- **Resume**: PNGs are written atomically (temporary file + rename) as ``DIR/samples/{k:06d}.png``; a rerun
  of the same command skips complete batches. ``DIR/samples.npz`` (``arr_0``, uint8 (N, H, W, 3)) is built
  from the PNGs at the end, so a killed-and-resumed run ends with exactly the npz of an uninterrupted one.
- A JSON record ``DIR/sample_ddp.json`` holds the configuration (a rerun with another configuration is
  refused) and the timings of every run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from stepcache.errors import ConfigError

__all__ = ["DDPSampleConfig", "image_seed", "sample_batch", "pending_batches", "assemble_npz", "run_ddp_sampling",
           "init_distributed"]

RECORD = "sample_ddp.json"


@dataclass(frozen=True)
class DDPSampleConfig:
    """Everything that decides the pixels of sample k (a resumed run must use the same values)."""

    num_samples: int
    batch_size: int
    global_seed: int
    num_steps: int
    sampler: str
    cfg_scale: float
    model: str
    policy: dict
    guide_channels: str | None = None


def image_seed(global_seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a run seeded ``global_seed`` (numpy SeedSequence mixing)."""
    state = np.random.SeedSequence([int(global_seed) & 0xFFFFFFFF, int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _generators(global_seed: int, indices: range, device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(image_seed(global_seed, k)) for k in indices]


def sample_batch(model, indices: range, cfg: DDPSampleConfig, device: torch.device, policy=None):
    """Latents or pixels (n, C, H, W) and labels (n,) of samples ``indices``, each from its own generator."""
    import stepcache

    gens = _generators(cfg.global_seed, indices, device)
    labels = torch.stack([torch.randint(model.num_classes, (), generator=g, device=device) for g in gens])  # (n,)
    shape = (model.in_channels, model.input_size, model.input_size)
    noise = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])  # (n, C, H, W)
    out = stepcache.sample(model, noise, labels, num_steps=cfg.num_steps, sampler=cfg.sampler,
                           cfg_scale=cfg.cfg_scale, policy=policy, guide_channels=cfg.guide_channels,
                           generator=gens)
    return out, labels


def batches(num_samples: int, batch_size: int) -> list[range]:
    """The fixed batches: batch j = samples [j*B, min((j+1)*B, N))."""
    return [range(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]


def png_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / "samples" / f"{index:06d}.png"


def pending_batches(out_dir: Path, num_samples: int, batch_size: int) -> list[int]:
    """Indices of the batches that have at least one missing PNG."""
    return [j for j, idx in enumerate(batches(num_samples, batch_size))
            if not all(png_path(out_dir, k).is_file() for k in idx)]


def write_png(path: Path, image: np.ndarray) -> None:
    """Atomically write one uint8 (H, W, 3) image."""
    from PIL import Image

    from stepcache.cli.common import atomic_write

    atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


def assemble_npz(out_dir: Path, num_samples: int) -> Path:
    """Read PNGs 0..N-1 into ``DIR/samples.npz`` (``arr_0``, uint8 (N, H, W, 3)), written atomically."""
    from PIL import Image

    from stepcache.cli.common import atomic_write

    missing = [k for k in range(num_samples) if not png_path(out_dir, k).is_file()]
    if missing:
        raise ConfigError(f"{len(missing)} of {num_samples} samples are missing in {out_dir}/samples "
                          f"(first: {missing[0]}); rerun the same command to finish them.")
    arr = np.stack([np.asarray(Image.open(png_path(out_dir, k)).convert("RGB")) for k in range(num_samples)])
    path = Path(out_dir) / "samples.npz"
    atomic_write(path, lambda f: np.savez(f, arr_0=arr))
    return path


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device): under torchrun, init NCCL (GPU) or gloo (CPU); else a single process."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
    else:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _check_record(out_dir: Path, cfg: DDPSampleConfig) -> dict:
    """The existing record (or a new one); refuses a directory sampled with another configuration."""
    path = Path(out_dir) / RECORD
    if not path.is_file():
        return {"config": asdict(cfg), "runs": []}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{path} is not a readable sample_ddp record; use a fresh --out-dir.") from None
    if record.get("config") != json.loads(json.dumps(asdict(cfg))):
        raise ConfigError(f"{out_dir} holds samples of another configuration (see {path}); use a fresh --out-dir "
                          "or the same options as before.")
    return record


def _broadcast(obj, rank: int, world: int):
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_ddp_sampling(model, cfg: DDPSampleConfig, out_dir: Path, to_uint8: Callable, policy=None,
                     progress: bool = True, extra_record: dict | None = None) -> dict:
    """Sample the pending batches on every rank, then (rank 0) write ``samples.npz`` and the JSON record.

    ``to_uint8`` maps the sampler's output (n, C, H, W) to uint8 images (n, H, W, 3) (decode latents there).
    Returns this run's timing record (on every rank).
    """
    rank, world, device = init_distributed()
    torch.manual_seed(cfg.global_seed * world + rank)  # DiT's per-rank seed (nothing below draws from it)
    out_dir = Path(out_dir)
    record = _check_record(out_dir, cfg)
    pending = _broadcast(pending_batches(out_dir, cfg.num_samples, cfg.batch_size) if rank == 0 else None,
                         rank, world)
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
    if rank == 0:
        npz_start = time.perf_counter()
        npz = assemble_npz(out_dir, cfg.num_samples)
        wall = max(run["rank_seconds"])
        run.update(sampling_seconds=wall, npz_seconds=time.perf_counter() - npz_start, npz=str(npz),
                   samples_per_second=run["samples_sampled"] / wall if wall > 0 else None)
        record["runs"].append(run)
        from stepcache.cli.common import write_json

        write_json(out_dir / RECORD, record)
    if world > 1:
        dist.barrier()
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
        for k, img in zip(idx, images):
            write_png(png_path(out_dir, k), img)
        done += len(idx)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return done
