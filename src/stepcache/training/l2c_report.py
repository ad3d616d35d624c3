"""What a Learning-to-Cache router does (Ma et al., arXiv 2406.01733, Fig. 5): the share of units
(attention / MLP branches) skipped at each cache step at a threshold, as a table and a heat map, and
the expected multiply-accumulates of one sampling run next to the uncached ones (from the DiT
adapter's MAC functions; CFG doubles both alike, so the ratio holds with or without it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from stepcache.policies.l2c import is_cache_step, recompute_mask


def model_for_macs(meta: dict | None = None, preset: str | None = None, input_size: int = 32):
    """A DiT skeleton on the meta device (no memory) from router metadata or a preset, else None."""
    from stepcache.models.dit import DiT

    with torch.device("meta"):
        if preset is not None:
            return DiT.from_preset(preset, input_size=input_size)
        config = ((meta or {}).get("model") or {}).get("config")
        return DiT(**config) if config else None


def expected_macs(keep: torch.Tensor, model) -> dict:
    """MACs per sample of one run with the recompute table ``keep`` (S, 2*depth) bool vs uncached."""
    from stepcache.adapters.dit import dit_macs

    macs = dit_macs(model)
    T = model.num_tokens
    attn, mlp, fixed = macs["attn"](T), macs["mlp"](T), macs["fixed"]
    S, units = keep.shape
    uncached = S * (fixed + units // 2 * (attn + mlp))
    executed = S * fixed + int(keep[:, 0::2].sum()) * attn + int(keep[:, 1::2].sum()) * mlp
    return {"macs_executed": executed, "macs_uncached": uncached, "mac_ratio": executed / uncached,
            "ideal_speedup": uncached / executed}


def router_report(logits: torch.Tensor, threshold: float, model=None) -> dict:
    """Per-step skipped shares (cache steps), totals, and expected MACs when ``model`` is given."""
    S = logits.shape[0]
    keep = recompute_mask(logits, threshold)  # (S, 2D)
    beta = torch.sigmoid(logits.float())
    steps = []
    for i in range(S - 1, -1, -1):
        k = keep[i]
        steps.append({"i": i, "cache_step": is_cache_step(i, S),
                      "attn_skipped": int((~k[0::2]).sum()), "mlp_skipped": int((~k[1::2]).sum()),
                      "skipped_share": float((~k).float().mean()), "mean_beta": float(beta[i].mean())})
    cache = [s for s in steps if s["cache_step"]]
    units = logits.shape[1]
    report = {
        "num_steps": S, "depth": units // 2, "threshold": float(threshold), "steps": steps,
        "cache_step_units": len(cache) * units,
        "skipped_units": sum(s["attn_skipped"] + s["mlp_skipped"] for s in cache),
        "attn_skipped": sum(s["attn_skipped"] for s in cache), "mlp_skipped": sum(s["mlp_skipped"] for s in cache),
    }
    report["skipped_share_cache_steps"] = report["skipped_units"] / max(1, report["cache_step_units"])
    report["skipped_share_all_steps"] = report["skipped_units"] / (S * units)
    if model is not None:
        report.update(expected_macs(keep, model))
    return report


def format_table(report: dict) -> str:
    """A plain-text table: one line per cache step, then the totals."""
    D = report["depth"]
    lines = [f"router: {report['num_steps']} steps, depth {D}, threshold {report['threshold']}",
             f"{'step':>5} {'attn skipped':>13} {'mlp skipped':>12} {'skipped':>8} {'mean beta':>10}"]
    for s in report["steps"]:
        if s["cache_step"]:
            lines.append(f"{s['i']:>5} {s['attn_skipped']:>9}/{D:<3} {s['mlp_skipped']:>8}/{D:<3} "
                         f"{s['skipped_share']:>8.1%} {s['mean_beta']:>10.3f}")
    half = report["cache_step_units"] // 2
    lines.append(f"cache steps: {report['skipped_units']}/{report['cache_step_units']} units skipped "
                 f"({report['skipped_share_cache_steps']:.2%}; attention {report['attn_skipped']}/{half}, "
                 f"MLP {report['mlp_skipped']}/{half}); {report['skipped_share_all_steps']:.2%} of all units")
    if "macs_executed" in report:
        lines.append(f"expected MACs per sample: {report['macs_executed'] / 1e9:.3f} of "
                     f"{report['macs_uncached'] / 1e9:.3f} G ({report['mac_ratio']:.1%}; ideal speedup "
                     f"{report['ideal_speedup']:.2f}x)")
    return "\n".join(lines)


def heatmap_figure(logits: torch.Tensor, threshold: float, title: str = ""):
    """The figure of :func:`heatmap`: integer ticks on both axes (units and cache steps are counts), a title
    wrapped to the figure's width."""
    import textwrap

    from stepcache.errors import require

    matplotlib = require("matplotlib", "Plotting")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    S = logits.shape[0]
    rows = [i for i in range(S - 1, -1, -1) if is_cache_step(i, S)]
    beta = torch.sigmoid(logits.float())[rows]  # (cache steps, 2D)
    skip = beta <= threshold
    width = max(4.0, 0.18 * beta.shape[1] + 1.5)
    fig, ax = plt.subplots(figsize=(width, max(2.5, 0.28 * len(rows) + 1.2)))
    im = ax.imshow(beta.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ys, xs = torch.nonzero(skip, as_tuple=True)
    ax.scatter(xs.numpy(), ys.numpy(), s=6, c="white", edgecolors="black", linewidths=0.3, marker="o",
               label=f"skipped (beta <= {threshold})")
    step = max(1, len(rows) // 25)  # at most ~25 step labels, every one an integer step index
    ax.set_yticks(range(0, len(rows), step), [str(rows[k]) for k in range(0, len(rows), step)])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.5, beta.shape[1] - 0.5)
    ax.set_xlabel("unit (2l: attention of layer l, 2l+1: its MLP)")
    ax.set_ylabel("cache step i")
    text = title or f"L2C router: {int(skip.sum())}/{skip.numel()} cache-step units skipped"
    ax.set_title("\n".join(textwrap.wrap(text, max(24, int(width * 11)))), fontsize=10)
    fig.colorbar(im, ax=ax, label="beta = sigmoid(logit)")
    if len(xs):
        # below the axes (kept by the tight bounding box), where it hides no cell
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), fontsize=7, frameon=False)
    return fig


def heatmap(logits: torch.Tensor, threshold: float, path, title: str = "") -> Path:
    """PNG: beta of every unit at every cache step, skipped units marked with a dot; saved with a tight bounding
    box so that a long title or tick labels are never clipped."""
    import matplotlib.pyplot as plt

    fig = heatmap_figure(logits, threshold, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
