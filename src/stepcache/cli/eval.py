"""``stepcache eval``: FID, sFID, Inception Score, precision and recall of a sample npz (ADM's evaluator).

The reference npz may hold images (``arr_0``) and/or precomputed statistics (``mu``, ``sigma``, ``mu_s``,
``sigma_s``), like ADM's ``VIRTUAL_imagenet256_labeled.npz``. ``--features digits`` uses the embedded
model's digit classifier so that the whole path runs offline (its numbers are not Inception numbers).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from stepcache.cli.common import environment, positive_int, require_file, write_json
from stepcache.io import OutputError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="FID / sFID / IS / precision / recall of a sample npz",
                       description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=Path, required=True, help="sample batch npz (arr_0: uint8 (N, H, W, 3))")
    p.add_argument("--ref", type=Path, required=True, help="reference batch npz (images and/or mu/sigma), or "
                   "digits:test / digits:train for the embedded model's real digits")
    p.add_argument("--features", choices=("inception", "digits"), default="inception",
                   help="feature network (default: %(default)s)")
    p.add_argument("--inception", type=Path, default=None,
                   help="path of inception-2015-12-05.pt, overriding the cache folder (default: $STEPCACHE_INCEPTION, "
                        "else the file in $STEPCACHE_HOME, default ~/.cache/stepcache, downloaded there and "
                        "checked against its pinned SHA-256 when online)")
    p.add_argument("--inception-sha256", default=None,
                   help="required SHA-256 of the Inception file (default: $STEPCACHE_INCEPTION_SHA256, else the "
                        "pinned digest for the cached file, or the digest recorded beside an --inception file when it "
                        "was first verified)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N: where the feature network (Inception / digit "
                   "classifier) runs (default: cuda when available, else cpu)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON result file (default: the samples path with suffix .eval.json)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from stepcache.cli.common import resolve_device
    from stepcache.eval.adm import evaluate
    from stepcache.eval.features import load_extractor

    torch.backends.cuda.matmul.allow_tf32 = False  # metrics in full precision (EDM / ADM practice)
    torch.backends.cudnn.allow_tf32 = False
    require_file(str(args.samples), "The npz file")
    if not str(args.ref).startswith("digits:"):
        require_file(str(args.ref), "The npz file")
    device = str(resolve_device(args.device))  # a bad or absent device: one sentence before any work
    out = args.out or args.samples.with_suffix(".eval.json")
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder, not a file.")
    start = time.perf_counter()
    if args.features == "inception":
        from stepcache.eval.features import InceptionFeatures

        extractor = InceptionFeatures(args.inception, device=device, sha256=args.inception_sha256)
    else:
        extractor = load_extractor(args.features, args.inception, device=device)
    result = evaluate(args.samples, args.ref, extractor, batch_size=args.batch_size, device=device)
    record = {"command": "eval", "samples": str(args.samples), "ref": str(args.ref), "features": args.features,
              "device": device, "feature_network_sha256": getattr(extractor, "sha256", None),
              "feature_network_official": getattr(extractor, "official", None),
              "result": result.as_dict(), "seconds": time.perf_counter() - start, "environment": environment()}
    write_json(out, record)
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        value = record["result"][key]
        print(f"{key}: {'n/a' if value is None else f'{value:.4f}'}")
    print(json.dumps({"written": str(out)}))
    return 0
