"""stepcache on the diffusers video pipelines (CogVideoX, Wan 2.1, LTX-Video): executed MACs and CPU time.

Models: the real diffusers transformers at reduced size (``--depth`` blocks, ``--heads`` x ``--head-dim``
channels), random weights (fan-in scaled, as in tests/test_diffusers_video.py), driven by their real
pipelines with CFG and prompt embeddings passed in (``vae=None``, latents out). Video: 5 latent frames of
16 x 16 latents (patch 2: 320 tokens per row; LTX at patch 1 on 8 x 8 latents: 320), ``--text-len`` text
tokens, ``--steps`` steps.

Per method: the ideal speedup from stepcache's MAC accounting (exact for these families: the tests check it
against an independent count), the measured speedup in process CPU time (median over ``--repeats``
interleaved rounds of uncached time / method time; one torch thread), and the distance of the final latents
from the uncached ones (max abs, relative L2). Random weights say nothing of quality.

Usage: ``python benchmarks/bench_diffusers_video.py [--quick]``; writes benchmarks/results/diffusers_video.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import stepcache  # noqa: E402
from stepcache import FBCache, FORA, NoCache, TaylorSeer, ToCa  # noqa: E402
from helpers import randomize_fan_in  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=8, help="transformer blocks (default: %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    p.add_argument("--head-dim", type=int, default=32, help="channels per head (default: %(default)s)")
    p.add_argument("--text-len", type=int, default=64, help="text tokens (default: %(default)s)")
    p.add_argument("--steps", type=int, default=12, help="sampling steps (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="depth 4, 6 steps, 1 round")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "diffusers_video")
    args = p.parse_args()
    if args.quick:
        args.depth, args.steps, args.repeats = 4, 6, 1
    return args


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build(name: str, a):
    """(pipeline, run) of one family at the benchmark's size."""
    import diffusers as d

    torch.manual_seed(0)
    D, L = a.heads * a.head_dim, a.text_len
    pe, ne = torch.randn(1, L, 64, generator=_g(1)), torch.randn(1, L, 64, generator=_g(2))
    common = dict(prompt=None, prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=a.steps,
                  output_type="latent")
    if name == "cogvideox":
        tr = d.CogVideoXTransformer3DModel(num_attention_heads=a.heads, attention_head_dim=a.head_dim, in_channels=16,
                                           out_channels=16, time_embed_dim=64, text_embed_dim=64, num_layers=a.depth,
                                           sample_width=16, sample_height=16, sample_frames=17, patch_size=2,
                                           max_text_seq_length=L)
        sched = d.CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                         rescale_betas_zero_snr=True)
        pipe = d.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=randomize_fan_in(tr),
                                   scheduler=sched)
        latents = torch.randn(1, 5, 16, 16, 16, generator=_g(3))
        kw = dict(height=128, width=128, num_frames=17, guidance_scale=6.0, latents=latents)
    elif name == "wan":
        tr = d.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=a.heads, attention_head_dim=a.head_dim,
                                     in_channels=16, out_channels=16, text_dim=64, freq_dim=64, ffn_dim=4 * D,
                                     num_layers=a.depth)
        sched = d.UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)
        pipe = d.WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=randomize_fan_in(tr),
                             scheduler=sched)
        latents = torch.randn(1, 16, 5, 16, 16, generator=_g(3))
        kw = dict(height=128, width=128, num_frames=17, guidance_scale=5.0, latents=latents)
    else:
        tr = d.LTXVideoTransformer3DModel(in_channels=32, out_channels=32, num_attention_heads=a.heads,
                                          attention_head_dim=a.head_dim, cross_attention_dim=D, num_layers=a.depth,
                                          caption_channels=64)
        pipe = d.LTXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=randomize_fan_in(tr),
                             scheduler=d.FlowMatchEulerDiscreteScheduler())
        latents = torch.randn(1, 5 * 8 * 8, 32, generator=_g(3))
        mask = torch.ones(1, L)
        kw = dict(height=256, width=256, num_frames=33, guidance_scale=3.0, latents=latents, prompt_attention_mask=mask,
                  negative_prompt_attention_mask=mask)
    pipe.set_progress_bar_config(disable=True)
    return pipe, lambda: pipe(**common, **kw).frames


def methods(name: str) -> dict:
    toca = dict(score="kv-norm") if name == "cogvideox" else {}
    return {"none": NoCache(), "FORA(2)": FORA(2), "FORA(3)": FORA(3),
            "ToCa(N=3, R=0.3)": ToCa(interval=3, fresh_ratio=0.3, bonus_grid=2, **toca),
            "TaylorSeer(N=3, order=1)": TaylorSeer(interval=3, order=1, warmup=1),
            "FBCache(0.2)": FBCache(threshold=0.2), "FBCache(0.5)": FBCache(threshold=0.5)}


def timed(pipe, run, policy):
    with stepcache.apply(pipe, policy) as handle:
        start = time.process_time()
        out = run()
        seconds = time.process_time() - start
        stats = handle.stats()
    return out, seconds, stats


def bench_family(name: str, a) -> dict:
    pipe, run = build(name, a)
    table = methods(name)
    outs, stats, times = {}, {}, {m: [] for m in table}
    for m, policy in table.items():  # warm-up pass: outputs and statistics
        outs[m], _, stats[m] = timed(pipe, run, policy)
    for _ in range(a.repeats):  # interleaved rounds: a drift of the machine hits every method alike
        for m, policy in table.items():
            times[m].append(timed(pipe, run, policy)[1])
    base = outs["none"].float()
    rows = {}
    for m in table:
        rounds = [times["none"][k] / times[m][k] for k in range(a.repeats)]
        diff = (outs[m].float() - base)
        rows[m] = {"ideal_speedup": round(stats[m].ideal_speedup, 3),
                   "measured_speedup": round(statistics.median(rounds), 3),
                   "seconds_median": round(statistics.median(times[m]), 3),
                   "nfe": stats[m].nfe, "max_abs": float(diff.abs().max()),
                   "rel_l2": float(diff.norm() / base.norm()), "tokens": stats[m].num_tokens}
        print(f"{name:10s} {m:26s} ideal {rows[m]['ideal_speedup']:.2f}x  measured {rows[m]['measured_speedup']:.2f}x  "
              f"rel L2 {rows[m]['rel_l2']:.3g}", flush=True)
    return rows


def main() -> None:
    a = parse()
    torch.set_num_threads(1)
    results = {name: bench_family(name, a) for name in ("cogvideox", "wan", "ltx")}
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = {"command": " ".join(["python"] + sys.argv), "date": date,
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread, "
                         "shared and loaded (another training run on the same 2 cores)",
              "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
              "settings": {k: v for k, v in vars(a).items() if k != "out"}, "results": results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    lines = [f"# diffusers video families ({record['date']})", "", f"`{record['command']}`; {record['machine']}; "
             f"depth {a.depth}, width {a.heads * a.head_dim}, {a.steps} steps, CFG, {a.repeats} rounds.", "",
             "| family | method | ideal (MACs) | measured (CPU time) | rel. L2 to uncached |", "|---|---|---|---|---|"]
    for name, rows in results.items():
        for m, r in rows.items():
            lines.append(f"| {name} | {m} | {r['ideal_speedup']:.2f}x | {r['measured_speedup']:.2f}x "
                         f"| {r['rel_l2']:.3g} |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
