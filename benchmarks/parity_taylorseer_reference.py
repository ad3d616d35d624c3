"""TaylorSeer parity: stepcache's schedule, factor update and forecast against the reference code run itself.

Needs a checkout of the reference (Shenyi-Z/TaylorSeer @288776d or later): pass its ``TaylorSeer-DiT``
folder as ``--ref-dir``. Only ``taylor_utils/__init__.py`` and ``cache_functions/cal_type.py`` are
loaded (by path, so the rest of the package and its timm import are not needed); nothing of the
reference is shipped. The reference counts DiT's steps DOWN (i = S-1..0), stepcache counts steps
taken (s = S-1-i): odd-order factors therefore differ exactly in sign, and every forecast must be
bitwise identical.

    .venv/bin/python benchmarks/parity_taylorseer_reference.py --ref-dir /tmp/ref-ts/TaylorSeer-DiT \\
        --out benchmarks/results/parity_taylorseer_reference.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

from stepcache.policies.taylorseer import TaylorSeer, TaylorSeries, is_full_step

CASES = [(50, 3, 3), (50, 4, 4), (50, 5, 2), (50, 6, 1), (250, 4, 4), (20, 3, 2)]  # (S, N, order); W = 2


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(ref_utils, ref_cal_type, S: int, N: int, order: int, shape=(2, 5, 8)) -> dict:
    cache_dic = {"cache": {-1: {0: {}}}, "interval": N, "max_order": order, "first_enhance": 2, "cache_counter": 0}
    current = {"num_steps": S, "activated_steps": [49], "layer": 0, "module": "attn"}
    config = TaylorSeer(interval=N, order=order, warmup=2)
    ours = TaylorSeries(order, dtype=torch.float32, differences_from=config.warmup - 1)
    gen = torch.Generator().manual_seed(S * 100 + N * 10 + order)
    full, worst_factor, worst_forecast, schedule_ok = [], 0.0, 0.0, True
    for i in range(S - 1, -1, -1):
        s = S - 1 - i
        current["step"] = i
        ref_cal_type(cache_dic, current)
        feature = torch.randn(*shape, generator=gen) * (1 + 0.1 * s) + 0.3 * s  # (B, T, D)
        schedule_ok &= (current["type"] == "full") == is_full_step(s, config)
        if current["type"] == "full":
            full.append(i)
            ref_utils.taylor_cache_init(cache_dic, current)
            ref_utils.derivative_approximation(cache_dic, current, feature)
            ours.update(feature, s)
            theirs = cache_dic["cache"][-1][0]["attn"]
            if len(theirs) != len(ours.factors):
                worst_factor = float("inf")
                continue
            for k, f in theirs.items():
                worst_factor = max(worst_factor, (f * (-1) ** k - ours.factors[k]).abs().max().item())
        else:
            diff = (ref_utils.taylor_formula(cache_dic, current) - ours.predict(s, torch.float32)).abs().max()
            worst_forecast = max(worst_forecast, diff.item())
    return {"num_steps": S, "interval": N, "order": order, "full_steps_i": full, "schedule_equal": schedule_ok,
            "max_factor_diff": worst_factor, "max_forecast_diff": worst_forecast}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref-dir", type=Path, required=True, help="the reference's TaylorSeer-DiT folder")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    utils = _load(args.ref_dir / "taylor_utils" / "__init__.py", "ref_taylor_utils")
    cal_type = _load(args.ref_dir / "cache_functions" / "cal_type.py", "ref_cal_type").cal_type
    results = [compare(utils, cal_type, *case) for case in CASES]
    for r in results:
        print(f"S={r['num_steps']} N={r['interval']} O={r['order']}: {len(r['full_steps_i'])} full steps, schedule "
              f"{'equal' if r['schedule_equal'] else 'DIFFERENT'}, max factor diff {r['max_factor_diff']}, "
              f"max forecast diff {r['max_forecast_diff']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"reference": "Shenyi-Z/TaylorSeer TaylorSeer-DiT", "cases": results},
                                       indent=1))
    ok = all(r["schedule_equal"] and r["max_factor_diff"] == 0 and r["max_forecast_diff"] == 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
