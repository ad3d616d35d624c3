"""What a tune leaves behind: the policy file, a markdown report with the Pareto front, and its plot.

The Pareto front is taken on the rung-0 seeds, the one chunk every candidate was sampled on, so its
points are comparable with each other (ideal speedup from MACs vs PSNR against the uncached images).
The finalists' table gives their figures on all calibration seeds and on the held-out seeds.
"""

from __future__ import annotations

import time
from pathlib import Path

from stepcache.bench.records import environment
from stepcache.policy_file import save_policy


def pareto_points(result: dict) -> list[tuple]:
    """(candidate, proxy figures) of every candidate that ran, and the front: not dominated in
    (ideal speedup, PSNR), sorted by speedup."""
    by_key = {c.key: c for c in result["candidates"]}
    pts = [(by_key[k], f) for k, f in result["proxy"].items()]
    front = [(c, f) for c, f in pts if not any(
        (g.ideal_speedup >= f.ideal_speedup and g.psnr >= f.psnr)
        and (g.ideal_speedup, g.psnr) != (f.ideal_speedup, f.psnr) for _, g in pts)]
    return pts, sorted(front, key=lambda cf: cf[1].ideal_speedup)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def finalists_table(rows: list[dict], chosen: dict) -> str:
    head = ("setting", "finalist of", "calib PSNR dB", "held-out PSNR dB", "gap dB", "held-out SSIM", "ideal speedup",
            "measured speedup", "held-out class acc", "held-out FD")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c, h = r["calibration"], r["held_out"]
        name = r["candidate"].label + (" **chosen**" if r is chosen else "")
        origin = "hand-picked" if r["hand_picked"] else r["searched"].describe()
        lines.append("| " + " | ".join([
            name, origin, f"{c.psnr:.2f}", f"{h.psnr:.2f}", f"{r['gap_db']:+.2f}", f"{h.ssim:.4f}",
            f"{h.ideal_speedup:.2f}x", _fmt(r["measured_speedup"], ".2f") + ("x" if r["measured_speedup"] else ""),
            _fmt(h.class_accuracy, ".3f"), _fmt(h.frechet_distance, ".2f")]) + " |")
    return "\n".join(lines) + "\n"


def front_table(front) -> str:
    lines = ["| setting | ideal speedup | PSNR dB | SSIM |", "|---|---|---|---|"]
    lines += [f"| {c.label} | {f.ideal_speedup:.2f}x | {f.psnr:.2f} | {f.ssim:.4f} |" for c, f in front]
    return "\n".join(lines) + "\n"


def pareto_plot(result: dict, path: Path, title: str) -> Path:
    """Ideal speedup vs PSNR on the rung-0 seeds: every candidate as a grey dot, the front's points
    labelled with their settings, the chosen policy starred, the target drawn as a line."""
    from stepcache.errors import require

    matplotlib = require("matplotlib", "Plotting")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts, front = pareto_points(result)
    fig, ax = plt.subplots(figsize=(12, 6.5), dpi=120)
    ax.scatter([f.ideal_speedup for _, f in pts], [f.psnr for _, f in pts], s=10, color="0.75",
               label=f"all {len(pts)} candidates")
    ax.plot([f.ideal_speedup for _, f in front], [f.psnr for _, f in front], "o-", color="C0", ms=5,
            label="Pareto front")
    for k, (c, f) in enumerate(front):
        ax.annotate(c.label, (f.ideal_speedup, f.psnr), fontsize=6, xytext=(4, 4 if k % 2 else -8),
                    textcoords="offset points")
    hand = [r["candidate"] for r in result["rows"] if r["hand_picked"]]
    if hand:
        figs = [result["hand_proxy"][c.key] for c in hand]
        ax.scatter([f.ideal_speedup for f in figs], [f.psnr for f in figs], marker="s", s=22, color="C2",
                   label="hand-picked (bench)")
        for c, f in zip(hand, figs):
            ax.annotate(c.label, (f.ideal_speedup, f.psnr), fontsize=6, color="C2", xytext=(4, -8),
                        textcoords="offset points")
    chosen = result["chosen"]["candidate"]
    if chosen.key in result["proxy"]:
        f = result["proxy"][chosen.key]
        ax.scatter([f.ideal_speedup], [f.psnr], marker="*", s=160, color="C3", zorder=5,
                   label=f"chosen: {chosen.label}")
    target = result["target"]
    if target.kind == "speedup":
        ax.axvline(target.value, color="C3", ls="--", lw=1, label=f"target {target.value:g}x ({result['basis']})")
        if result["searched_target"] != target:
            ax.axvline(result["searched_target"].value, color="C3", ls=":", lw=1,
                       label=f"searched at {result['searched_target'].value:g}x ideal")
    elif target.kind == "psnr":
        ax.axhline(target.value, color="C3", ls="--", lw=1, label=f"target {target.value:g} dB")
    ax.set_xlabel("ideal speedup (uncached MACs / executed MACs)")
    ax.set_ylabel(f"PSNR vs uncached (dB), {result['proxy_seeds']} seeds")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def hand_picked_line(result: dict) -> str:
    """One sentence: the best hand-picked setting that meets the target, beside the chosen policy."""
    target, rows = result["target"], [r for r in result["rows"] if r["hand_picked"]]
    if not rows:
        return ""
    measured = result["basis"] == "measured"

    def speed(r):
        return r["measured_speedup"] if measured and r["measured_speedup"] else r["held_out"].ideal_speedup

    if target.kind == "speedup":
        ok = sorted((r for r in rows if speed(r) >= target.value), key=lambda r: -r["calibration"].psnr)
    elif target.kind == "psnr":
        ok = sorted((r for r in rows if r["calibration"].psnr >= target.value), key=lambda r: -speed(r))
    else:
        ok = sorted((r for r in rows if (r["calibration"].frechet_distance or 0) <= target.value),
                    key=lambda r: -speed(r))
    kind = "measured" if measured else "ideal"
    if not ok:
        best = max(rows, key=speed)
        return (f"No hand-picked setting meets the target; the fastest is {best['candidate'].label} at "
                f"{speed(best):.2f}x {kind} speedup and {best['held_out'].psnr:.2f} dB held-out.\n\n")
    b, c = ok[0], result["chosen"]
    return (f"Best hand-picked setting meeting the target: {b['candidate'].label}, {b['held_out'].psnr:.2f} dB "
            f"held-out at {speed(b):.2f}x {kind} speedup (chosen: {c['held_out'].psnr:.2f} dB at {speed(c):.2f}x).\n\n")


def figures_dict(row: dict) -> dict:
    return {"calibration": row["calibration"].to_dict(), "held_out": row["held_out"].to_dict(),
            "held_out_gap_db": row["gap_db"], "measured_speedup": row["measured_speedup"]}


def report_markdown(result: dict, title: str) -> str:
    """The report: target and choice, what the search saw, finalists on held-out seeds, the front."""
    chosen, target, searched = result["chosen"], result["target"], result["searched_target"]
    how = "" if searched == target else f" (measured basis: searched at {searched.describe()})"
    methods = sorted({c.method for c in result["candidates"]})
    refused = ", ".join(sorted(result["errors"])) or "none"
    return (
        f"# stepcache tune: {title}\n\nTarget: {target.describe()}{how}. "
        f"Chosen: **{chosen['candidate'].label}** ({result['why']}).\n\n"
        f"{len(result['candidates'])} candidates from {', '.join(methods)}; {result['refused']} refused this "
        f"model or run ({refused}), {result['compute_only']} ruled out by compute alone (one unguided sample "
        f"each), {len(result['proxy'])} sampled for quality; {len(result['calibration_seeds'])} calibration "
        f"seeds, {len(result['held_out_seeds'])} held-out seeds.\n\n{hand_picked_line(result)}"
        f"## Finalists (and hand-picked settings) on held-out seeds\n\n{finalists_table(result['rows'], chosen)}\n"
        f"## Pareto front (rung-0 seeds, every candidate sampled for quality)\n\n"
        f"{front_table(pareto_points(result)[1])}")


def write_outputs(result: dict, tuned_for: dict, policy_path: Path, out_dir: Path, title: str) -> dict:
    """policy file, ``tune_report.md`` and ``tune_pareto.png``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = result["chosen"]
    hand = [r for r in result["rows"] if r["hand_picked"]]
    measured = {**figures_dict(chosen), "why": result["why"],
                "hand_picked": {r["candidate"].label: figures_dict(r) for r in hand}}
    search = {"candidates": len(result["candidates"]), "methods": sorted({c.method for c in result["candidates"]}),
              "refused": result["errors"], "calibration_seeds": result["calibration_seeds"],
              "held_out_seeds": result["held_out_seeds"]}
    policy = save_policy(policy_path, chosen["candidate"].policy, tuned_for, measured,
                         label=chosen["candidate"].label, search=search, environment=environment(),
                         created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    md = out_dir / "tune_report.md"
    md.write_text(report_markdown(result, title))
    png = pareto_plot(result, out_dir / "tune_pareto.png", title)
    return {"policy": policy, "report": md, "plot": png, "records": out_dir / "tune_records.jsonl"}
