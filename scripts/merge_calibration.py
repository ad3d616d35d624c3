"""Merge a `stepcache calibrate` record into the shipped MagCache / TeaCache tables under one name.

The shipped tables (``src/stepcache/assets/magcache_ratios.json``, ``teacache_coefficients.json``) hold
one entry per model; after retraining the embedded model its entry is replaced from a fresh calibration::

    stepcache calibrate --model embedded --num-samples 40 --num-sampling-steps 50 --sampler ddim \\
        --cfg-scale 4.0 --out /tmp/cal.json
    .venv/bin/python scripts/merge_calibration.py /tmp/cal.json --name embedded-ddim50
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stepcache.io import atomic_write
from stepcache.policies.calibration_data import ASSETS

MAGCACHE_FILE, TEACACHE_FILE = ASSETS / "magcache_ratios.json", ASSETS / "teacache_coefficients.json"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("record", type=Path, help="the JSON written by `stepcache calibrate --out`")
    ap.add_argument("--name", required=True, help="the table entry to replace, e.g. embedded-ddim50")
    ap.add_argument("--source", default=None, help="how the record was made (default: keep the entry's own)")
    args = ap.parse_args(argv)
    record = json.loads(args.record.read_text())
    for path, key in ((MAGCACHE_FILE, "mag_ratios"), (TEACACHE_FILE, "teacache_coefficients")):
        if record.get(key) is None:
            continue
        table = json.loads(path.read_text())
        old = table["models"].get(args.name, {})
        entry = {"families": old.get("families", []), "names": old.get("names", []),
                 "source": args.source or old.get("source", f"stepcache calibrate ({args.record.name})"),
                 "num_steps": record["num_steps"]}
        entry["mag_ratios" if key == "mag_ratios" else "coefficients"] = record[key]
        table["models"][args.name] = entry
        atomic_write(path, lambda f, t=table: f.write((json.dumps(t, indent=1) + "\n").encode()))
        print(f"{path.name}: replaced {args.name!r}")


if __name__ == "__main__":
    main()
