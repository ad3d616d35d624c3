"""Reference parity of ToCa's PixArt variant: stepcache on diffusers' ``PixArtTransformer2DModel`` against the
ToCa repository's PixArt-alpha code, run itself on the CPU.

Needs the ``PixArt-alpha-ToCa`` folder of Shenyi-Z/ToCa passed as ``ref_dir`` (nothing of it is shipped; its
GPU-only and missing imports get in-memory stand-ins, see ``benchmarks/pixart_ref.py``). A small random
PixArt-alpha is built in the reference's own ``PixArt`` class (the real blocks: self-attention, un-gated
cross-attention, MLP, adaLN-single; every zero-initialised layer re-randomised so that caching changes the
output), its state dict converted into a diffusers ``PixArtTransformer2DModel`` (diffusers'
``convert_pixart_alpha_to_diffusers`` key mapping, written fresh as ``pixart_ref.to_diffusers``), and compared:

(a) one uncached forward of each on the same inputs;
(b) whole DPM-Solver++ runs (20 steps, order 2, cfg 4.5) of the reference's own sampler ``DPMS``: the reference
    model (uncached = every module forced fresh; ToCa with its inference defaults: attention score, "ToCa"
    schedule, fresh_ratio 0.30, N = 3, global force-fresh, staleness 0.25) against the diffusers model behind
    :class:`Shim`, which looks like the reference model to ``DPMS`` and drives stepcache's clock
    (``begin_run`` / ``set_step``), uncached and with ``stepcache.ToCa()`` (its PixArt defaults).

Both sides record every block's full/partial decision and every top-k selection (step, layer, module, tokens,
and the score gap at the cut, to detect near-ties); the table lists the final-latent differences, the full
steps, the per-step token counts and the selections that differ. When selections differ, stepcache runs once
more taking the reference's tokens wherever the gap at the cut is below ``NEAR_TIE`` on either side: what
remains is not tie-breaking. Cases (``CASES``): depth 28 (one and two prompts), depth 4 (the reference's
layer normaliser 27 as is, then emulated), a model whose late latents saturate the cross-attention (exact
ties) and the entropy of the CFG mixture that stepcache used before this comparison. The last case is the
tiny model of tests/pixart_helpers.py; ``--dump-fixture`` saves the reference's numbers for the test.

    PYTHONPATH=src .venv/bin/python benchmarks/pixart_toca_parity.py /tmp/ref-pixart/PixArt-alpha-ToCa \
        [--dump-fixture tests/fixtures/pixart_toca_reference_tiny.pt]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# tests/pixart_helpers.py builds the fixture's model (and imports tests/helpers.py)
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]

import pixart_ref  # noqa: E402
from pixart_ref import cut_gap, record_reference, to_diffusers, to_reference  # noqa: E402
import stepcache  # noqa: E402
from stepcache.core.context import StepContext  # noqa: E402
from stepcache.policies import toca as toca_policy  # noqa: E402
from stepcache.policies import toca_scores  # noqa: E402

SMALL = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=32, num_heads=2, caption_channels=32,
             model_max_length=12)  # 16 x 16 = 256 tokens per row, 12 text tokens
STEPS, CFG = 20, 4.5
TOCA_ARGS = dict(cache_type="attention", ratio_scheduler="ToCa", fresh_ratio=0.30, fresh_threshold=3,
                 force_fresh="global", soft_fresh_weight=0.25)  # scripts/inference.py defaults
NEAR_TIE = 1e-6  # a score gap at the top-k cut below this is a near-tie (scores ~0.1, float32 ulp ~1e-8)
# (name, depth, text lengths of the prompts, what stepcache's side emulates (see ``emulation``), scale of the
# patch embedding: 1 lets the late, large latents saturate the cross-attention into exact ties)
CASES = [("depth28-b1", 28, (9,), None, 0.1), ("depth28-b2", 28, (9, 12), None, 0.1),
         ("depth4-b1", 4, (9,), None, 0.1), ("depth4-b1-norm27", 4, (9,), "norm27", 0.1),
         ("depth28-b1-saturating", 28, (9,), None, 1.0), ("depth28-b1-mixture-entropy", 28, (9,), "mixture", 0.1)]


# ---------------------------------------------------------------------------------- models
def reference_model(ref, depth: int, embed_scale: float = 0.1, seed: int = 0, **overrides):
    """The reference's PixArt, seeded, every Linear re-drawn (weights N(0, 1/fan_in), biases N(0, 0.05^2)) so
    that no layer is zero (the reference zero-initialises cross-attention outputs, the final layer, biases),
    the patch embedding scaled by ``embed_scale`` (see tests/pixart_helpers.tiny_pixart)."""
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # the constructor prints a lewei-scale warning
        model = ref.pixart.PixArt(depth=depth, **{**SMALL, **overrides})
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=m.in_features ** -0.5)
                torch.nn.init.normal_(m.bias, std=0.05)
        model.x_embedder.proj.weight.mul_(embed_scale)
    return model.eval()


def diffusers_twin(ref_model, depth: int):
    from diffusers import PixArtTransformer2DModel

    hidden, heads = SMALL["hidden_size"], SMALL["num_heads"]
    tr = PixArtTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4,
                                  out_channels=8, num_layers=depth, cross_attention_dim=hidden,
                                  caption_channels=SMALL["caption_channels"], sample_size=SMALL["input_size"],
                                  patch_size=SMALL["patch_size"], norm_type="ada_norm_single",
                                  use_additional_conditions=False, norm_elementwise_affine=False, norm_eps=1e-6)
    state = {k: v for k, v in ref_model.state_dict().items() if k not in ("pos_embed", "y_embedder.y_embedding")}
    tr.load_state_dict(to_diffusers(state, depth), strict=True)
    return tr.eval()


def inputs(lengths: tuple, seed: int = 1):
    """Noise, caption features and mask of each prompt (tests/pixart_helpers.pixart_inputs) at SMALL's sizes."""
    from tests.pixart_helpers import pixart_inputs

    return pixart_inputs(lengths, seed, text_len=SMALL["model_max_length"], channels=SMALL["caption_channels"],
                         side=SMALL["input_size"])


# ---------------------------------------------------------------------------------- the stepcache side
class Shim:
    """The diffusers transformer behind the reference model's ``forward_with_dpmsolver`` signature: the
    reference's ``DPMS`` calls it once per step with its ``current`` (``step`` counting up) and the
    [uncond; cond] batch; with a stepcache handle the run starts at step 0 and each call sets the clock."""

    def __init__(self, transformer, handle=None):
        self.transformer, self.handle = transformer, handle

    def forward_with_dpmsolver(self, x, timestep, current, cache_dic, y, mask=None, **_):
        rows, S, p = x.shape[0], current["num_steps"], current["step"]
        if self.handle is not None:
            if p == 0:
                self.handle.begin_run(S, rows, cfg=True, uncond_first=True)
            self.handle.set_step(StepContext(i=S - 1 - p, num_steps=S, t=float(timestep[0])))
        mask = mask.repeat(rows // mask.shape[0], 1)  # the reference reads the uncond rows under the cond mask
        out = self.transformer(x, encoder_hidden_states=y.squeeze(1), timestep=timestep, encoder_attention_mask=mask,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return out.chunk(2, dim=1)[0]  # (B, 4, H, W): the learned variance dropped


def record_stepcache(handle, log: dict, follow: dict | None = None) -> None:
    """Log the handler's block decisions {(p, layer): full} and selections {(p, layer, module): (index, gap)}.

    ``follow``: a reference log; where stepcache's tokens differ from the reference's and the score gap at the
    cut is below :data:`NEAR_TIE` on either side, take the reference's tokens (and set the staleness counter
    as if they had been chosen): what remains is the difference not explained by near-ties."""
    h = handle.handler
    block_full, select, score = h.block_full, h.select, h.score
    last = {}

    def full(i, S, layer):
        flag = block_full(i, S, layer)
        log["full"][(S - 1 - i, layer)] = flag
        return flag

    def scored(layer, counter, x):
        last["score"] = s = score(layer, counter, x)
        return s

    def chosen(ctx, layer, branch="mlp"):
        last.pop("score", None)
        before = h.state.counters.get((layer, branch))
        before = None if before is None else before.clone()
        index = select(ctx, layer, branch)
        key = (ctx.num_steps - 1 - ctx.i, layer, "cross-attn" if branch == "cross" else branch)
        gap = cut_gap(last.get("score"), index.shape[1])
        theirs = (follow or {}).get("select", {}).get(key)
        if theirs is not None and _tokens_differing(theirs[0], index) and min(
                g for g in (gap, theirs[1], float("inf")) if g is not None) < NEAR_TIE:
            index = theirs[0].clone()
            counter = h.state.counters[(layer, branch)]
            counter.copy_((0 if before is None else before) + 1)
            counter.scatter_(1, index, 0)
            log["followed"].append(key)
        log["select"][key] = (index.clone(), gap)
        return index

    h.block_full, h.select, h.score = full, chosen, scored


@contextlib.contextmanager
def emulation(name: str | None):
    """``"norm27"``: the reference's hard-coded layer normaliser 27 (28-layer PixArt-XL) in stepcache's ratio
    (stepcache uses depth - 1). ``"mixture"``: stepcache before this comparison, which took the entropy of
    the mixture of the CFG halves' maps instead of the reference's average over the packed captions."""
    ratio, entropy = toca_policy.pixart_ratio, toca_scores.cross_entropy
    if name == "norm27":
        toca_policy.pixart_ratio = lambda cfg, p, S, layer, depth, branch: ratio(cfg, p, S, layer, 28, branch)
    elif name == "mixture":
        toca_scores.cross_entropy = lambda cross_map, cfg, own_text=False: entropy(cross_map, cfg)
    try:
        yield
    finally:
        toca_policy.pixart_ratio, toca_scores.cross_entropy = ratio, entropy


# ---------------------------------------------------------------------------------- the reference side
def sample(ref, model_fn, null_y, noise, text, mask, cache_args: dict) -> torch.Tensor:
    """The reference's own DPM-Solver++ loop (scripts/inference.py): 20 steps, order 2, time-uniform, cfg 4.5."""
    kwargs = dict(mask=mask, **cache_args)
    solver = ref.dpms.DPMS(model_fn, condition=text, uncondition=null_y, cfg_scale=CFG, model_kwargs=kwargs)
    with contextlib.redirect_stderr(io.StringIO()):  # tqdm
        return solver.sample(noise.clone(), steps=STEPS, order=2, skip_type="time_uniform", method="multistep",
                             model_kwargs=kwargs)


# ---------------------------------------------------------------------------------- comparison
def new_log() -> dict:
    return {"full": {}, "select": {}, "followed": []}


def step_summary(log: dict, depth: int, tokens: int) -> dict:
    """Full steps (every layer full), mixed steps, and per step the tokens computed by cross-attention and
    MLP, summed over the layers, per batch row."""
    steps = sorted({p for p, _ in log["full"]})
    full = [p for p in steps if all(log["full"][(p, layer)] for layer in range(depth))]
    mixed = [p for p in steps if p not in full and any(log["full"][(p, layer)] for layer in range(depth))]
    counts = []
    for p in steps:
        per = {}
        for module in ("cross-attn", "mlp"):
            per[module] = sum(tokens if log["full"][(p, layer)] else log["select"][(p, layer, module)][0].shape[1]
                              for layer in range(depth))
        counts.append([p, per["cross-attn"], per["mlp"]])
    return {"full_steps": full, "mixed_steps": mixed, "tokens_per_step": counts}


def compare_selections(ours: dict, theirs: dict) -> dict:
    """Selections with a different token set in any row, the first of them, and the near-ties on both sides."""
    differ = []
    for key in sorted(theirs["select"]):
        a, b = theirs["select"][key][0], ours["select"].get(key, (None,))[0]
        if b is None or a.shape != b.shape or not torch.equal(a.sort(dim=1).values, b.sort(dim=1).values):
            differ.append(key)
    gaps = lambda log: [g for _, g in log["select"].values() if g is not None]  # noqa: E731
    ties = lambda log, bound: sum(g < bound for g in gaps(log))  # noqa: E731
    detail = [{"key": key, "gap_reference": theirs["select"][key][1], "gap_stepcache": ours["select"][key][1],
               "tokens_differing": _tokens_differing(theirs["select"][key][0], ours["select"][key][0])}
              for key in differ[:5]]
    return {"selections": len(theirs["select"]), "differing": len(differ), "first_differing": detail,
            "min_gap_reference": min(gaps(theirs), default=None), "min_gap_stepcache": min(gaps(ours), default=None),
            "near_ties_reference": ties(theirs, NEAR_TIE), "near_ties_stepcache": ties(ours, NEAR_TIE),
            "exact_ties_reference": ties(theirs, 1e-30), "exact_ties_stepcache": ties(ours, 1e-30)}


def _tokens_differing(a: torch.Tensor, b: torch.Tensor) -> int:
    """Tokens chosen on one side only, summed over the rows."""
    return sum(len(set(x.tolist()) ^ set(y.tolist())) for x, y in zip(a, b)) // 2


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a - b).abs().max().item()
    return {"max_abs": d, "rel": d / b.abs().max().item()}


def run_case(ref, name: str, depth: int, lengths: tuple, emulate: str | None, embed_scale: float) -> dict:
    model = reference_model(ref, depth, embed_scale)
    tr = diffusers_twin(model, depth)
    noise, text, mask = inputs(lengths)
    null = model.y_embedder.y_embedding
    out = {"case": name, "depth": depth, "text_lengths": list(lengths), "stepcache_emulates": emulate,
           "patch_embedding_scale": embed_scale}
    out.update(compare(ref, model, tr, noise, text, mask, null, emulate)[0])
    return out


def compare(ref, model, tr, noise, text, mask, null, emulate: str | None = None) -> tuple[dict, dict]:
    """(a) and (b) on one pair of twins; returns the report and the four final latents."""
    depth, tokens = len(model.blocks), model.x_embedder.num_patches
    null_y = null[None].repeat(noise.shape[0], 1, 1)[:, None]  # (B, 1, L, C)
    out = {"tokens_per_row": tokens}
    with torch.no_grad():
        # (a) one uncached forward on the [uncond; cond] batch at t = 500
        x, y = torch.cat([noise, noise]), torch.cat([null_y, text])
        t = torch.full((x.shape[0],), 500.0)
        cache_dic, current = ref.cache.cache_init(TOCA_ARGS, STEPS)
        current["step"] = 0
        ref_out = model(x, t, current, cache_dic, y, mask)
        ours_out = tr(x, encoder_hidden_states=y.squeeze(1), timestep=t, encoder_attention_mask=mask.repeat(2, 1),
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        out["forward_uncached"] = diff(ours_out, ref_out)
        # (b) whole runs in the reference's DPM-Solver++ loop
        logs = {k: new_log() for k in ("ref_plain", "ref_toca", "ours_toca")}
        with record_reference(ref, logs["ref_plain"], force_all=True):
            ref_plain = sample(ref, model.forward_with_dpmsolver, null_y, noise, text, mask, TOCA_ARGS)
        with record_reference(ref, logs["ref_toca"]):
            ref_toca = sample(ref, model.forward_with_dpmsolver, null_y, noise, text, mask, TOCA_ARGS)
        ours_plain = sample(ref, Shim(tr).forward_with_dpmsolver, null_y, noise, text, mask, TOCA_ARGS)
        with stepcache.apply(tr, stepcache.ToCa()) as handle, emulation(emulate):
            record_stepcache(handle, logs["ours_toca"])
            ours_toca = sample(ref, Shim(tr, handle).forward_with_dpmsolver, null_y, noise, text, mask, TOCA_ARGS)
            out["stepcache_policy"] = repr(handle.handler.config)
        if compare_selections(logs["ours_toca"], logs["ref_toca"])["differing"]:
            followed = new_log()
            with stepcache.apply(tr, stepcache.ToCa()) as handle, emulation(emulate):
                record_stepcache(handle, followed, follow=logs["ref_toca"])
                ours_followed = sample(ref, Shim(tr, handle).forward_with_dpmsolver, null_y, noise, text, mask,
                                       TOCA_ARGS)
            out["toca_run_following_reference_at_near_ties"] = {
                **diff(ours_followed, ref_toca), "followed": followed["followed"],
                "differing_after": compare_selections(followed, logs["ref_toca"])["differing"]}
    out["uncached_run"] = diff(ours_plain, ref_plain)
    out["toca_run"] = diff(ours_toca, ref_toca)
    out["toca_vs_uncached_reference"] = diff(ref_toca, ref_plain)  # what caching changes: parity must be far below
    out["reference"] = step_summary(logs["ref_toca"], depth, tokens)
    out["stepcache"] = step_summary(logs["ours_toca"], depth, tokens)
    out["same_schedule"] = out["reference"] == out["stepcache"]
    out["selections"] = compare_selections(logs["ours_toca"], logs["ref_toca"])
    return out, {"ref_plain": ref_plain, "ref_toca": ref_toca, "ours_plain": ours_plain, "ours_toca": ours_toca}


def fixture_case(ref, path: Path | None) -> dict:
    """The tiny model of tests/pixart_helpers.py (built in diffusers, mapped into the reference's class): the
    comparison above, plus stepcache's own copy of the reference sampler (``dpm_solver_2m``, what the test
    runs without the reference); with ``path`` the reference's latents and schedule are saved as the fixture."""
    from tests.pixart_helpers import TINY, dpm_solver_2m, guided_eps, null_caption, pixart_inputs, tiny_pixart

    c, lengths = TINY, (9,)
    tr, null = tiny_pixart(0), null_caption(0)
    model = reference_model(ref, c["depth"], input_size=c["side"], hidden_size=c["hidden"], num_heads=c["heads"],
                            caption_channels=c["caption_channels"], model_max_length=c["text_len"])
    state = to_reference(tr.state_dict(), c["depth"])
    model.load_state_dict({**state, "pos_embed": model.pos_embed, "y_embedder.y_embedding": null}, strict=True)
    noise, text, mask = pixart_inputs(lengths)
    out = {"case": "fixture-tiny", "depth": c["depth"], "text_lengths": list(lengths)}
    report, latents = compare(ref, model, tr, noise, text, mask, null)
    out.update(report)
    with torch.no_grad():
        loop_plain = dpm_solver_2m(guided_eps(tr, text, null, mask), noise)
        with stepcache.apply(tr, stepcache.ToCa()) as handle:
            loop_toca = dpm_solver_2m(guided_eps(tr, text, null, mask, handle=handle), noise)
    out["helper_loop_uncached"] = diff(loop_plain, latents["ref_plain"])
    out["helper_loop_toca"] = diff(loop_toca, latents["ref_toca"])
    if path is not None:
        torch.save({"steps": STEPS, "cfg": CFG, "text_lengths": lengths, "uncached": latents["ref_plain"],
                    "toca": latents["ref_toca"], **out["reference"]}, path)
        print(f"fixture written to {path}")
    return out


def _followed(r: dict) -> str:
    f = r.get("toca_run_following_reference_at_near_ties")
    return "-" if f is None else f"{f['rel']:.1e} ({len(f['followed'])} ties followed, {f['differing_after']} differ)"


def table(results: list) -> str:
    head = ("case", "fwd rel", "uncached rel", "ToCa rel", "ToCa max abs", "ToCa vs plain", "schedule", "sel. differ",
            "ToCa rel, near-ties as ref")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in results:
        lines.append(" | ".join([r["case"], f"{r['forward_uncached']['rel']:.1e}", f"{r['uncached_run']['rel']:.1e}",
                                 f"{r['toca_run']['rel']:.1e}", f"{r['toca_run']['max_abs']:.1e}",
                                 f"{r['toca_vs_uncached_reference']['rel']:.1e}",
                                 "same" if r["same_schedule"] else "DIFFERENT",
                                 f"{r['selections']['differing']}/{r['selections']['selections']}", _followed(r)]))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ref_dir", type=Path, help="extracted PixArt-alpha-ToCa folder of Shenyi-Z/ToCa")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pixart_toca_parity.json")
    parser.add_argument("--cases", nargs="*", default=[c[0] for c in CASES], choices=[c[0] for c in CASES])
    parser.add_argument("--dump-fixture", type=Path, default=None,
                        help="also write the tiny case's reference latents "
                             "(tests/fixtures/pixart_toca_reference_tiny.pt)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ref = pixart_ref.load(args.ref_dir)
    started, results = time.perf_counter(), []
    for case in CASES:
        if case[0] in args.cases:
            results.append(run_case(ref, *case))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    results.append(fixture_case(ref, args.dump_fixture))
    print(table(results[-1:]).splitlines()[-1], flush=True)
    print(table(results))
    for r in results:
        print(f"{r['case']}: reference full steps {r['reference']['full_steps']} mixed {r['reference']['mixed_steps']};"
              f" near-ties (gap < {NEAR_TIE}) ref {r['selections']['near_ties_reference']}"
              f" ours {r['selections']['near_ties_stepcache']},"
              f" exact ties ref {r['selections']['exact_ties_reference']}"
              f" ours {r['selections']['exact_ties_stepcache']}; differing {r['selections']['first_differing']}")
    fixture = results[-1]
    print(f"fixture-tiny, tests/pixart_helpers.dpm_solver_2m vs the reference's DPMS: uncached "
          f"{fixture['helper_loop_uncached']['rel']:.1e}, ToCa {fixture['helper_loop_toca']['rel']:.1e} relative")
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": "CPU, 2 shared cores, "
            f"loaded (parity only, no timing); torch {torch.__version__}, 1 thread",
            "command": "PYTHONPATH=src python benchmarks/pixart_toca_parity.py "
            "<PixArt-alpha-ToCa>", "reference": "Shenyi-Z/ToCa PixArt-alpha-ToCa, xformers/timm/mmcv stand-ins",
            "model": SMALL, "steps": STEPS, "cfg": CFG, "reference_cache_args": TOCA_ARGS,
            "wall_s": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
