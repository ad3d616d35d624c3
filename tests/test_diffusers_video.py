"""diffusers video families (CogVideoX, Wan 2.1, LTX-Video): tiny random configurations of the real classes,
driven by their real pipelines, offline.

No tokenizer or text encoder: prompt embeddings are passed in; ``vae=None`` and ``output_type="latent"``.
Weights are re-randomised fan-in scaled with norm gains near 1 (``helpers.randomize_fan_in``; the default init
and ``helpers.randomize`` leave the blocks' contribution ~1e-6 of the stream, so caching would change nothing
measurable).
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # the pipelines import it even without encoders

import stepcache  # noqa: E402
from helpers import pipeline_family, randomize_fan_in  # noqa: E402
from stepcache import (DBCache, FBCache, FORA, Forecast, MagCache, NoCache, TaylorSeer, TeaCache,  # noqa: E402
                       ToCa)
from stepcache.errors import ConfigError  # noqa: E402

STEPS = 4


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ tiny families
def build_cogvideox():
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    tr = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                     time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8,
                                     sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                     max_text_seq_length=6)
    scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                       rescale_betas_zero_snr=True)
    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=randomize_fan_in(tr),
                             scheduler=scheduler)


def run_cogvideox(pipe, rows=(0,), steps=STEPS, dtype=torch.float32):
    n = len(rows)
    pe = torch.cat([_randn(1, 6, 16, seed=r) for r in rows]).to(dtype)
    ne = torch.cat([_randn(1, 6, 16, seed=50 + r) for r in rows]).to(dtype)
    latents = torch.cat([_randn(1, 3, 4, 8, 8, seed=100 + r) for r in rows]).to(dtype)
    return pipe(prompt=None, prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=64, num_frames=9,
                num_inference_steps=steps, guidance_scale=6.0, output_type="latent", latents=latents,
                num_videos_per_prompt=1).frames[:n]


def build_wan():
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                               out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    scheduler = UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=randomize_fan_in(tr),
                       scheduler=scheduler)


def run_wan(pipe, rows=(0,), steps=STEPS, dtype=torch.float32):
    pe = torch.cat([_randn(1, 6, 16, seed=r) for r in rows]).to(dtype)
    ne = torch.cat([_randn(1, 6, 16, seed=50 + r) for r in rows]).to(dtype)
    latents = torch.cat([_randn(1, 4, 2, 8, 8, seed=100 + r) for r in rows]).to(dtype)
    return pipe(prompt=None, prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=64, num_frames=5,
                num_inference_steps=steps, guidance_scale=5.0, output_type="latent", latents=latents).frames


def build_ltx():
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(0)
    tr = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                                    attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=16)
    return LTXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=randomize_fan_in(tr),
                       scheduler=FlowMatchEulerDiscreteScheduler())


def run_ltx(pipe, rows=(0,), steps=STEPS, dtype=torch.float32):
    n = len(rows)
    pe = torch.cat([_randn(1, 6, 16, seed=r) for r in rows]).to(dtype)
    ne = torch.cat([_randn(1, 6, 16, seed=50 + r) for r in rows]).to(dtype)
    mask = torch.ones(n, 6)
    mask[:, 5:] = 0  # one padding token in the prompt
    latents = torch.cat([_randn(1, 32, 8, seed=100 + r) for r in rows]).to(dtype)  # packed (B, F*H*W, C)
    return pipe(prompt=None, prompt_embeds=pe, prompt_attention_mask=mask, negative_prompt_embeds=ne,
                negative_prompt_attention_mask=torch.ones(n, 6), height=128, width=128, num_frames=9,
                num_inference_steps=steps, guidance_scale=3.0, output_type="latent", latents=latents).frames


FAMILIES = {"cogvideox": (build_cogvideox, run_cogvideox), "wan": (build_wan, run_wan), "ltx": (build_ltx, run_ltx)}
CALLS_PER_STEP = {"cogvideox": 1, "wan": 2, "ltx": 1}  # WanPipeline: cond and uncond calls
TOKENS = {"cogvideox": (48, (12, 4)), "wan": (32, (8, 4)), "ltx": (32, (8, 4))}  # frames*H*W, (frames*H, W)
# ToCa per family: CogVideoX has joint attention (value norms, DiT rules); Wan/LTX the cross-attention entropy
TOCA = {"cogvideox": dict(score="kv-norm", bonus_grid=2), "wan": dict(bonus_grid=2), "ltx": dict(bonus_grid=2)}


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return pipeline_family(FAMILIES, request.param)


# ------------------------------------------------------------------------------ invariants
def test_noop_equals_plain_pipeline_and_remove_restores(family):
    name, pipe, run, base = family
    cls, tr = type(pipe), pipe.transformer
    for policy in (FORA(1), NoCache(), ToCa(interval=1, **TOCA[name])):
        with stepcache.apply(pipe, policy) as handle:
            assert torch.equal(run(pipe), base), policy
            stats = handle.stats()
            assert stats.nfe == STEPS * CALLS_PER_STEP[name] and stats.ideal_speedup == 1.0
            assert (handle.info.num_tokens, handle.info.grid) == TOKENS[name]
    assert type(pipe) is cls and all("forward" not in m.__dict__ for m in tr.modules())
    assert "step" not in pipe.scheduler.__dict__
    assert torch.equal(run(pipe), base)


def _policies(name):
    return {
        "fora": FORA(2),
        "toca": ToCa(interval=2, fresh_ratio=0.3, **TOCA[name]),
        "taylorseer": TaylorSeer(interval=2, order=1, warmup=1),
        "forecast": Forecast(num_full=2, order=1),
        "fbcache": FBCache(threshold=10.0),
        "dbcache": DBCache(front=1, back=0, warmup=1, threshold=10.0),
        "teacache": TeaCache(threshold=10.0, coefficients=(1.0, 0.0)),
        "magcache": MagCache(threshold=10.0, mag_ratios=(1.0,) * STEPS),
    }


@pytest.mark.parametrize("method", list(_policies("wan")))
def test_each_policy_runs_and_saves_work(family, method):
    name, pipe, run, base = family
    with stepcache.apply(pipe, _policies(name)[method]) as handle:
        out = run(pipe)
        stats = handle.stats()
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert (out - base).abs().max() > 1e-6, method  # the cache changed the result
    assert stats.nfe == STEPS * CALLS_PER_STEP[name]
    assert 0 < stats.macs_executed < stats.macs_uncached
    assert 0 < stats.mac_ratio < 1 and stats.ideal_speedup == pytest.approx(1 / stats.mac_ratio)
    kinds = stats.kind_counts()
    assert 0 < kinds["full"] < sum(kinds.values())  # some steps were not computed in full
    assert torch.equal(run(pipe), base)  # removed


def test_batch_rows_are_independent(family):
    name, pipe, run, _ = family
    with stepcache.apply(pipe, ToCa(interval=2, fresh_ratio=0.3, **TOCA[name])):
        both = run(pipe, rows=(0, 1))
        one = run(pipe, rows=(1,))
    assert torch.allclose(both[1:], one, atol=1e-5, rtol=1e-4)


def _count_macs(pipe, name, run):
    """Independent count of one plain run: every Linear / Conv application, plus the two attention products
    (2 * queries * keys * inner) of every attention call, from forward hooks."""
    total = [0]

    def linear(m, inputs, output):
        total[0] += inputs[0].numel() // m.in_features * m.in_features * m.out_features

    def conv(m, inputs, output):
        k = 1
        for s in m.kernel_size:
            k *= s
        total[0] += output[0, 0].numel() * output.shape[0] * m.in_channels * m.out_channels * k

    def attention(m, args, kwargs):
        a = dict(zip(("hidden_states", "encoder_hidden_states"), args), **kwargs)
        x, e = a["hidden_states"], a.get("encoder_hidden_states")
        inner = m.to_q.out_features
        if e is None:
            q = k = x.shape[1]
        elif name == "cogvideox":  # joint attention over [text; video]
            q = k = x.shape[1] + e.shape[1]
        else:
            q, k = x.shape[1], e.shape[1]
        total[0] += 2 * x.shape[0] * q * k * inner

    hooks = []
    for m in pipe.transformer.modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear))
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            hooks.append(m.register_forward_hook(conv))
        elif hasattr(m, "to_q") and hasattr(m, "to_out"):
            hooks.append(m.register_forward_pre_hook(attention, with_kwargs=True))
    try:
        run(pipe)
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def test_mac_accounting_is_exact(family):
    name, pipe, run, _ = family
    counted = _count_macs(pipe, name, run)
    with stepcache.apply(pipe, NoCache()) as handle:
        run(pipe)
        stats = handle.stats()
    assert stats.macs_uncached == stats.macs_executed == counted


def test_spans_of_blocks_apply_to_the_video_stream(family):
    """Spans (FBCache/DBCache/MagCache/TeaCache's unit): computed at every step they equal the plain pipeline bit
    for bit; reused, the residual has the stream's shape (CogVideoX: [video; text], its block returns (video,
    text))."""
    from test_engine import SpanProbe

    name, pipe, run, base = family
    with stepcache.apply(pipe, SpanProbe(spans_=((0, 1), (1, 2)), every=1)):
        assert torch.equal(run(pipe), base)
    with stepcache.apply(pipe, SpanProbe(spans_=((0, 2),), every=2)) as handle:
        out = run(pipe)
        observed = handle.handler.observed
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    T, L = TOKENS[name][0], 6
    width = T + L if name == "cogvideox" else T
    assert {o[1] for _, _, o, _ in observed} == {width} and all(o == x for _, _, o, x in observed)


# ------------------------------------------------------------------------------ capabilities and clear errors
def test_capabilities_per_family():
    from stepcache.adapters import find_adapter

    caps = {}
    for name, (build, _) in FAMILIES.items():
        target, adapter = find_adapter(build())
        caps[name] = adapter.info(target).capabilities
    assert caps["cogvideox"] == {"value_norms", "modulated_input"}
    assert caps["wan"] == caps["ltx"] == {"attention_map", "value_norms", "modulated_input"}


def test_cogvideox_refuses_map_scores_naming_usable_ones():
    pipe = build_cogvideox()
    with pytest.raises(ConfigError, match="kv-norm"):
        stepcache.apply(pipe, ToCa(score="attention", bonus_grid=2))
    assert all("forward" not in m.__dict__ for m in pipe.transformer.modules())


@pytest.mark.parametrize("name", ["wan", "ltx"])
def test_toca_defaults_to_the_cross_attention_entropy_rules(name):
    """Wan/LTX blocks are PixArt's layout (gated self-attention, un-gated cross-attention, gated MLP): ToCa takes
    its PixArt rules, scoring tokens by the entropy of their cross-attention map; the default 4x4 bonus cells do
    not fit the family's default video (30 or 16 x 22 tokens a frame), which is said at apply time."""
    build, run = FAMILIES[name]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ConfigError, match="bonus_grid"):
        stepcache.apply(pipe, ToCa())
    base = run(pipe)
    with stepcache.apply(pipe, ToCa(interval=2, bonus_grid=2)) as handle:
        assert handle.handler.pixart and handle.handler.config.score == "attention"
        out = run(pipe)
        kinds = handle.stats().kind_counts()
    assert kinds["partial"] > 0 and torch.isfinite(out).all() and not torch.equal(out, base)
    with stepcache.apply(pipe, ToCa(interval=2, fresh_ratio=0.0, bonus_grid=2)) as handle:
        run(pipe)  # R = 0: full steps counted up (p % N), nothing recomputed in between
        stats = handle.stats()
    assert stats.full_steps() == [3, 1] and set(stats.decisions[2].values()) == {0}
    with stepcache.apply(pipe, FORA(2)):
        fora = run(pipe)
    with stepcache.apply(pipe, ToCa(interval=2, fresh_ratio=0.0, variant="dit")):
        assert torch.equal(run(pipe), fora)  # DiT's rules at R = 0 are FORA


def _attention_inputs(name, pipe):
    """(an attn1 module, a call of it with its RoPE, an attn2 module, its text keys and mask) from one plain call."""
    blocks = pipe.transformer.blocks if name == "wan" else pipe.transformer.transformer_blocks
    seen = {}

    def grab(key):
        def hook(m, args, kwargs):
            seen.setdefault(key, (args, kwargs))
        return hook

    hooks = [blocks[0].attn1.register_forward_pre_hook(grab("self"), with_kwargs=True),
             blocks[0].attn2.register_forward_pre_hook(grab("cross"), with_kwargs=True)]
    FAMILIES[name][1](pipe, steps=1)
    for h in hooks:
        h.remove()
    return blocks[0], seen


@pytest.mark.parametrize("name", ["wan", "ltx"])
def test_attention_maps_follow_the_processors(name):
    """The maps a score reads are the processors' own attention weights: weights @ values through the output
    projection reproduce diffusers' outputs (self-attention with its RoPE, cross-attention with the mask)."""
    from stepcache.adapters.diffusers.video_sites import qk_rms_map, qk_rms_weights

    pipe = FAMILIES[name][0]()
    pipe.set_progress_bar_config(disable=True)
    block, seen = _attention_inputs(name, pipe)
    for key, attn in (("self", block.attn1), ("cross", block.attn2)):
        args, kwargs = seen[key]
        a = dict(zip(("hidden_states", "encoder_hidden_states", "attention_mask", "rotary_emb"), args), **kwargs)
        x, ctx, mask = a["hidden_states"], a.get("encoder_hidden_states"), a.get("attention_mask")
        rotary = a.get("rotary_emb", a.get("image_rotary_emb")) if key == "self" else None
        with torch.no_grad():
            want = attn(*args, **kwargs)
            rope = name if key == "self" else None
            p = qk_rms_weights(attn, x, ctx, mask, rotary, rope)  # (B, H, T, N)
            v = attn.to_v(x if ctx is None else ctx).unflatten(2, (attn.heads, -1)).transpose(1, 2)  # (B, H, N, hd)
            got = attn.to_out[0]((p @ v).transpose(1, 2).flatten(2))
            mean = qk_rms_map(attn, x, ctx, mask, rotary, rope)
        assert torch.allclose(got, want, atol=1e-5), key
        assert torch.equal(mean, p.mean(dim=1))
        assert torch.allclose(mean.sum(-1), torch.ones(mean.shape[:2]), atol=1e-5)
        if name == "ltx" and key == "cross":
            assert mean[1, :, 5].abs().max() < 1e-3  # the cond row's padding token gets no attention


def test_magcache_and_teacache_without_data_say_how_to_get_it():
    for name, (build, run) in FAMILIES.items():
        pipe = build()
        pipe.set_progress_bar_config(disable=True)
        for policy in (MagCache(), TeaCache()):
            with pytest.raises(ConfigError, match="calibrate|coefficients"):
                with stepcache.apply(pipe, policy):
                    run(pipe, steps=2)
            assert all("forward" not in m.__dict__ for m in pipe.transformer.modules())


def test_teacache_probe_is_the_first_blocks_attention_input(family):
    """The modulated input TeaCache reads equals what the first block's attention receives, bit for bit."""
    from stepcache.adapters.diffusers.probes import modulated_input, supports_modulated_input
    from stepcache.adapters.diffusers.common import _call_args

    name, pipe, run, _ = family
    tr = pipe.transformer
    block = (tr.blocks if name == "wan" else tr.transformer_blocks)[0]
    assert supports_modulated_input(block)
    seen = {}
    h1 = block.register_forward_pre_hook(lambda m, a, k: seen.setdefault("block", (a, k)), with_kwargs=True)
    h2 = block.attn1.register_forward_pre_hook(lambda m, a, k: seen.setdefault("attn", (a, k)), with_kwargs=True)
    run(pipe, steps=1)
    h1.remove()
    h2.remove()
    args, kwargs = seen["block"]
    with torch.no_grad():
        m, macs = modulated_input(block, _call_args(block.forward, args, kwargs))
    a, k = seen["attn"]
    assert torch.equal(m, k.get("hidden_states", a[0] if a else None)) and macs >= 0


# ------------------------------------------------------------------------------ bfloat16
def test_bfloat16_runs_cached(family):
    name, pipe, run, _ = family
    build = FAMILIES[name][0]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.to(torch.bfloat16)
    base = run(pipe, dtype=torch.bfloat16)
    with stepcache.apply(pipe, FORA(1)):
        assert torch.equal(run(pipe, dtype=torch.bfloat16), base)
    with stepcache.apply(pipe, ToCa(interval=2, fresh_ratio=0.3, **TOCA[name])) as handle:
        out = run(pipe, dtype=torch.bfloat16)
        stats = handle.stats()
    assert torch.isfinite(out.float()).all() and stats.macs_executed < stats.macs_uncached


@pytest.mark.parametrize("variant,frames,tokens", [("rope", 3, 48), ("rope+temporal-patches", 4, 32)])
def test_cogvideox_5b_and_1_5_layouts(variant, frames, tokens):
    """CogVideoX-5b's RoPE and CogVideoX 1.5's temporal patches (p_t = 2: F/2 x H/p x W/p tokens): exact no-op,
    exact MACs, ToCa saves work."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    extra = dict(use_rotary_positional_embeddings=True)
    if variant != "rope":
        extra.update(patch_size_t=2, use_learned_positional_embeddings=False)
    torch.manual_seed(0)
    tr = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                     time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8,
                                     sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                     max_text_seq_length=6, **extra)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=randomize_fan_in(tr),
                             scheduler=CogVideoXDDIMScheduler(prediction_type="v_prediction",
                                                              timestep_spacing="trailing", rescale_betas_zero_snr=True))
    pipe.set_progress_bar_config(disable=True)
    pe, ne, latents = _randn(1, 6, 16, seed=0), _randn(1, 6, 16, seed=1), _randn(1, frames, 4, 8, 8, seed=2)

    def run(p, steps=STEPS):
        return p(prompt=None, prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=64,
                 num_frames=(frames - 1) * 4 + 1, num_inference_steps=steps, guidance_scale=6.0, output_type="latent",
                 latents=latents).frames

    base = run(pipe)
    counted = _count_macs(pipe, "cogvideox", run)
    with stepcache.apply(pipe, FORA(1)) as handle:
        assert torch.equal(run(pipe), base)
        assert handle.info.num_tokens == tokens and handle.stats().macs_uncached == counted
    with stepcache.apply(pipe, ToCa(interval=2, fresh_ratio=0.3, **TOCA["cogvideox"])) as handle:
        out = run(pipe)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert handle.stats().macs_executed < handle.stats().macs_uncached


def test_toca_checks_the_bonus_cells_against_the_called_resolution():
    """The token grid is read at call time: a video whose frames are 3 x 3 tokens cannot take 2 x 2 bonus cells,
    said in one sentence before the first step (not a reshape error inside the score); bonus=0 runs."""
    pipe = build_wan()
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(prompt=None, prompt_embeds=_randn(1, 6, 16, seed=0),
                    negative_prompt_embeds=_randn(1, 6, 16, seed=1), height=48, width=48, num_frames=5,
                    num_inference_steps=3, guidance_scale=5.0, output_type="latent").frames

    with stepcache.apply(pipe, ToCa(interval=2, bonus_grid=2)) as handle:
        with pytest.raises(ConfigError, match="got 6x3"):
            run()
        assert handle.stats().nfe == 0
    with stepcache.apply(pipe, ToCa(interval=2, bonus=0.0)) as handle:
        assert torch.isfinite(run()).all() and handle.info.grid == (6, 3)


def test_calibration_feeds_magcache_and_teacache(family):
    """The `stepcache calibrate` recorder on a video pipeline: one magnitude ratio per step and TeaCache's
    polynomial from block 0's modulated input (Wan: both CFG calls of each step); the policies then run on it."""
    from stepcache.training.calibrate import calibrate

    name, pipe, run, base = family
    steps = 6  # TeaCache's degree-4 fit needs at least 5 (input change, output change) pairs
    record = calibrate(pipe, lambda: run(pipe, steps=steps))
    assert record["num_steps"] == steps and len(record["mag_ratios"]) == steps
    assert record["pairs"] == (steps - 1) * CALLS_PER_STEP[name] and len(record["teacache_coefficients"]) == 5
    for policy in (MagCache(threshold=0.5, mag_ratios=tuple(record["mag_ratios"])),
                   TeaCache(threshold=1.0, coefficients=tuple(record["teacache_coefficients"]))):
        with stepcache.apply(pipe, policy) as handle:
            out = run(pipe, steps=steps)
        assert torch.isfinite(out).all() and handle.stats().macs_executed < handle.stats().macs_uncached, policy
