"""``stepcache router-report``: what a Learning-to-Cache router skips, per step, and its expected MACs.

Prints a table, writes ``router_heatmap.png`` and ``router_report.json`` into --out. MACs come from
the model recorded in a stepcache router file, or from --model (a DiT preset) for reference routers.
"""

from __future__ import annotations

from pathlib import Path

from stepcache.cli.common import check_output_dir, finite_float, require_file, write_json
from stepcache.errors import ConfigError, ModelMismatchError


def add_parser(sub) -> None:
    p = sub.add_parser("router-report", help="skipped units per step and expected MACs of an L2C router",
                       description=__doc__.splitlines()[0])
    p.add_argument("router", help="router file (reference .pt or stepcache .safetensors)")
    p.add_argument("--threshold", type=finite_float, default=None,
                   help="recompute iff sigmoid(logit) > threshold (default: the file's, else 0.1)")
    p.add_argument("--model", default=None, help="DiT preset for the MAC count, e.g. DiT-XL/2 (default: the "
                   "model recorded in the file)")
    p.add_argument("--image-size", type=int, choices=(256, 512), default=256,
                   help="image size for --model (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("router_report"), help="output folder (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from stepcache.models.dit import parse_preset
    from stepcache.policies.l2c import load_router
    from stepcache.training.l2c_report import format_table, heatmap, model_for_macs, router_report

    check_output_dir(args.out, "--out")
    logits, meta = load_router(require_file(args.router, "router file"))
    threshold = args.threshold if args.threshold is not None else float(meta.get("threshold", 0.1))
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold must lie in [0, 1], got {threshold}.")
    if args.model is not None:
        parse_preset(args.model)
    model = model_for_macs(meta, args.model, args.image_size // 8)
    if model is not None and len(model.blocks) * 2 != logits.shape[1]:
        which = args.model or "the recorded model"
        raise ModelMismatchError(f"the router is for a {logits.shape[1] // 2}-layer model but {which} has "
                                 f"{len(model.blocks)} layers.")
    report = router_report(logits, threshold, model)
    print(format_table(report))
    if model is None:
        print("(no model known for the MAC count: pass --model, e.g. DiT-XL/2)")
    png = heatmap(logits, threshold, args.out / "router_heatmap.png", title=f"{Path(args.router).name} @ {threshold}")
    write_json(args.out / "router_report.json", {"router": str(args.router), "metadata": meta, **report})
    print(f"wrote {png} and {args.out / 'router_report.json'}")
    return 0
