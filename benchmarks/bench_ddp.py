"""Samples per second of ``stepcache sample-ddp`` with 1 and 2 processes (torchrun, gloo, CPU), uncached and FORA.

Each configuration is a fresh torchrun job writing a fresh folder; the rate is samples / the slowest rank's
sampling time (from the run's JSON record, so process start-up, model loading and the final npz are excluded;
they are reported separately as ``job_seconds``). Every process gets ``--threads`` torch threads (default 1,
so 2 processes use twice the cores of 1; on a shared machine a 2-thread single process measured 8x slower
than this from oversubscription, so it is not the default).
The images of every configuration are compared with the uncached 1-process run (``identical_to_uncached_1p``
for the 2-process uncached run, mean absolute pixel difference for FORA).

    .venv/bin/python benchmarks/bench_ddp.py --num-samples 32 --batch-size 8 --out benchmarks/results/ddp.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def run_job(procs: int, cache: list[str], out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m",
           "stepcache", "sample-ddp", "--num-samples", str(args.num_samples), "--out-dir", str(out),
           "--per-proc-batch-size", str(args.batch_size), "--global-seed", "0", "--no-progress", *args.model, *cache]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    job = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    record = json.loads((out / "sample_ddp.json").read_text())
    run = record["runs"][-1]
    return {"processes": procs, "cache": " ".join(cache) or "none", "samples": args.num_samples,
            "samples_per_second": run["samples_per_second"], "sampling_seconds": run["sampling_seconds"],
            "rank_seconds": run["rank_seconds"], "job_seconds": job,
            "threads_per_process": run["threads_per_process"], "config": record["config"],
            "environment": run["environment"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8, help="per-process batch size")
    ap.add_argument("--interval", type=int, default=3, help="FORA interval")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default: %(default)s)")
    ap.add_argument("--model", nargs="*", default=["--model", "embedded"],
                    help="model options passed to sample-ddp (default: the embedded model with its defaults)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ddp.json"))
    args = ap.parse_args()

    rows, arrays = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for cache in ([], ["--cache", "fora", "--interval", str(args.interval)]):
            for procs in (1, 2):
                out = Path(tmp) / f"{procs}-{len(cache)}"
                row = run_job(procs, cache, out, args)
                with np.load(out / "samples.npz") as f:
                    arrays[(procs, row["cache"])] = f["arr_0"]
                rows.append(row)
                print(f"{row['cache']:>18} x{procs}: {row['samples_per_second']:.3f} samples/s "
                      f"(sampling {row['sampling_seconds']:.1f} s, job {row['job_seconds']:.1f} s)", flush=True)
    base = arrays[(1, "none")].astype(np.int16)
    for row in rows:
        arr = arrays[(row["processes"], row["cache"])].astype(np.int16)
        row["identical_to_uncached_1p"] = bool((arr == base).all())
        row["mean_abs_pixel_diff_vs_uncached_1p"] = float(np.abs(arr - base).mean())
    result = {"benchmark": "sample-ddp samples/s, CPU, torchrun gloo", "date": datetime.now(timezone.utc).isoformat(),
              "num_samples": args.num_samples, "per_proc_batch_size": args.batch_size, "rows": rows,
              "threads_per_process": args.threads,
              "note": "shared 2-core machine under load from other jobs; numbers are indicative"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
