"""diffusers integration: tiny random configurations of the real classes and pipelines, built offline.

Prompt embeddings are passed directly (no tokenizer, no hub), latents come out with
``output_type="latent"`` (DiT decodes with a one-level AutoencoderKL). Zero-initialised layers are
re-randomised, so caching changes the output.
"""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # the text-to-image pipelines import it even without encoders

import stepcache  # noqa: E402
from helpers import pipeline_family  # noqa: E402
from stepcache import FORA, NoCache  # noqa: E402
from stepcache.errors import ClockError, ConfigError, UnsupportedModelError  # noqa: E402
from stepcache.core.policy import Policy, PolicyConfig, register_policy  # noqa: E402
from stepcache.core.actions import COMPUTE, COMPUTE_WITH_MAP, REUSE, Compute, Partial  # noqa: E402
from stepcache.core.context import StepContext  # noqa: E402
from helpers import randomize  # noqa: E402

STEPS = 3


# ------------------------------------------------------------------------------ recording test policy
@dataclass(frozen=True)
class Probe(PolicyConfig):
    """Test policy: compute at the first step, then reuse ``attn``, recompute ``partial`` branches on the
    first ``k`` tokens (or all with k=None), ask for maps on ``map_branch``; records every context."""

    k: int | None = None
    partial: tuple = ()
    map_branch: str = ""
    values: bool = False  # ask for value norms on "attn"
    method: ClassVar[str] = "test-probe"


@register_policy(Probe)
class ProbeHandler(Policy):
    def reset(self, run):
        super().reset(run)
        self.seen, self.maps, self.runs = [], [], getattr(self, "runs", []) + [run]

    def decide(self, ctx, site, view):
        layer, branch = site.layer, site.name
        self.seen.append((ctx.i, ctx.call, layer, branch))
        if ctx.is_first:
            if self.config.values and branch == "attn":
                return Compute(need_values=True)
            return COMPUTE_WITH_MAP if branch == self.config.map_branch else COMPUTE
        if branch in self.config.partial:
            T = self.info.num_tokens
            k = T if self.config.k is None else self.config.k
            return Partial(torch.arange(k).expand(self.run.batch, k))
        return REUSE

    def observe(self, ctx, site, result):
        if result.attn_map is not None:
            self.maps.append(result.attn_map)
        if result.values is not None:
            self.maps.append(result.values)


# ------------------------------------------------------------------------------ tiny families
def _seed(seed=0):
    torch.manual_seed(seed)


def build_dit():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    _seed()
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                               num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, layers_per_block=1)
    return DiTPipeline(transformer=randomize(tr).eval(), vae=vae.eval(), scheduler=DDIMScheduler())


def run_dit(pipe, rows=(0,), steps=STEPS, cfg=4.0):
    gens = [torch.Generator().manual_seed(r) for r in rows]
    return pipe(class_labels=[3 + r for r in rows], guidance_scale=cfg, generator=gens, num_inference_steps=steps,
                output_type="pt").images


def _embeds(rows, L, D, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(1, L, D, generator=torch.Generator().manual_seed(seed + r)) for r in rows]), g


def _latents(rows, shape):
    return torch.cat([torch.randn(1, *shape, generator=torch.Generator().manual_seed(100 + r)) for r in rows])


def build_pixart():
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    _seed()
    tr = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=2, cross_attention_dim=16, caption_channels=32, sample_size=8,
                                  patch_size=2,
                                  norm_type="ada_norm_single", use_additional_conditions=False,
                                  norm_elementwise_affine=False, norm_eps=1e-6)
    return PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=randomize(tr).eval(),
                               scheduler=DPMSolverMultistepScheduler())


def run_pixart(pipe, rows=(0,), steps=STEPS, cfg=4.5):
    pe, _ = _embeds(rows, 6, 32, 0)
    ne, _ = _embeds(rows, 6, 32, 50)
    mask = torch.ones(len(rows), 6)
    mask[:, 5:] = 0  # one padding token
    return pipe(prompt=None, negative_prompt=None, prompt_embeds=pe, prompt_attention_mask=mask,
                negative_prompt_embeds=ne, negative_prompt_attention_mask=torch.ones(len(rows), 6), height=64,
                width=64, latents=_latents(rows, (4, 8, 8)), num_inference_steps=steps, guidance_scale=cfg,
                output_type="latent", use_resolution_binning=False).images


def build_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    _seed()
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                               pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)
    return StableDiffusion3Pipeline(transformer=randomize(tr).eval(), scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)


def run_sd3(pipe, rows=(0,), steps=STEPS, cfg=5.0):
    pe, _ = _embeds(rows, 6, 32, 0)
    ne, _ = _embeds(rows, 6, 32, 50)
    pp = torch.cat([torch.randn(1, 32, generator=torch.Generator().manual_seed(7 + r)) for r in rows])
    return pipe(prompt=None, prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pp,
                negative_pooled_prompt_embeds=-pp, height=64, width=64, latents=_latents(rows, (4, 8, 8)),
                num_inference_steps=steps, guidance_scale=cfg, output_type="latent").images


def build_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    _seed()
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=randomize(tr).eval())


def run_flux(pipe, rows=(0,), steps=STEPS, cfg=1.0):
    pe, _ = _embeds(rows, 6, 32, 0)
    pp = torch.cat([torch.randn(1, 32, generator=torch.Generator().manual_seed(7 + r)) for r in rows])
    extra = {}
    if cfg > 1:  # true CFG: the transformer is called twice per step
        extra = dict(true_cfg_scale=cfg, negative_prompt_embeds=_embeds(rows, 6, 32, 50)[0],
                     negative_pooled_prompt_embeds=-pp)
    return pipe(prompt=None, prompt_embeds=pe, pooled_prompt_embeds=pp, height=64, width=64,
                latents=_latents(rows, (16, 16)), num_inference_steps=steps, output_type="latent", **extra).images


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


FAMILIES = {"dit": (build_dit, run_dit), "pixart": (build_pixart, run_pixart), "sd3": (build_sd3, run_sd3),
            "flux": (build_flux, run_flux)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return pipeline_family(FAMILIES, request.param)


# ------------------------------------------------------------------------------ invariants per family
def test_noop_equals_uncached_and_remove_restores(family):
    name, pipe, run, base = family
    cls, tr = type(pipe), pipe.transformer
    with stepcache.apply(pipe, FORA(1)) as handle:
        assert type(pipe).__name__ == cls.__name__
        assert torch.equal(run(pipe), base)
        stats = handle.stats()
        assert stats.nfe == STEPS * (1 if name != "flux" else 1) and stats.ideal_speedup == 1.0
    assert type(pipe) is cls and "forward" not in tr.__dict__ and "step" not in pipe.scheduler.__dict__
    assert all("forward" not in m.__dict__ for m in tr.modules())
    assert torch.equal(run(pipe), base)


def test_active_fora_changes_output_and_saves_work(family):
    name, pipe, run, base = family
    with stepcache.apply(pipe, FORA(2)) as handle:
        out = run(pipe)
        stats = handle.stats()
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-7
    assert stats.full_steps() == [2, 0] and stats.macs_executed < stats.macs_uncached


def test_batch_rows_are_independent(family):
    name, pipe, run, _ = family
    with stepcache.apply(pipe, FORA(2)):
        both = run(pipe, rows=(0, 1))
        one = run(pipe, rows=(1,))
    assert torch.allclose(both[1:], one, atol=1e-5, rtol=1e-4)


def test_clock_follows_the_scheduler_and_resets_each_call(family):
    name, pipe, run, _ = family
    with stepcache.apply(pipe, Probe()) as handle:
        run(pipe, steps=3)
        run(pipe, rows=(0, 1), steps=5)
        seen, runs = handle.handler.seen, handle.handler.runs
    steps = sorted({i for i, *_ in seen}, reverse=True)
    assert steps == [4, 3, 2, 1, 0]
    nums = [r.num_steps for r in runs if r is not None]
    assert 3 in nums and nums[-1] == 5 and nums.index(5) > max(n for n, s in enumerate(nums) if s == 3)
    cfg = name != "flux"
    assert runs[-1].cfg is cfg and runs[-1].batch == (4 if cfg else 2)
    assert runs[-1].uncond_first is (name in ("pixart", "sd3"))


def test_partial_on_all_tokens_matches_full(family):
    name, pipe, run, base = family
    partial = ("mlp", "cross")
    with stepcache.apply(pipe, Probe(k=None, partial=partial)):
        every = run(pipe)
    with stepcache.apply(pipe, Probe(partial=())):  # everything reused after the first step
        reused = run(pipe)
    assert torch.isfinite(every).all() and (every - reused).abs().max() > 1e-7


def test_value_norms_keep_the_output(family):
    """kv-norm style scores: value norms (B, H, T) of the image tokens, output unchanged (fused attention)."""
    name, pipe, run, base = family
    with stepcache.apply(pipe, Probe(values=True)) as handle:
        out = run(pipe, steps=2)
        values = handle.handler.maps
    T = handle.info.num_tokens
    assert values and all(v.shape == (2 if name != "flux" else 1, 2, T) for v in values)
    with stepcache.apply(pipe, Probe()):  # the same decisions without value norms
        assert torch.equal(out, run(pipe, steps=2))


# ------------------------------------------------------------------------------ family specifics
def test_pixart_cross_attention_map_for_toca():
    pipe = build_pixart()
    with stepcache.apply(pipe, Probe(map_branch="cross")) as handle:
        run_pixart(pipe, steps=2)
        maps = handle.handler.maps
    assert len(maps) == 2 and maps[0].shape == (2, 16, 6)  # CFG rows, image tokens, text tokens
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 16), atol=1e-5)
    assert maps[0][1, :, 5].abs().max() < 1e-3  # the cond row's padding token gets no attention


def test_flux_true_cfg_two_calls_per_step():
    pipe = build_flux()
    pipe.set_progress_bar_config(disable=True)
    base = run_flux(pipe, cfg=3.0, steps=2)
    with stepcache.apply(pipe, Probe()) as handle:
        run_flux(pipe, cfg=3.0, steps=2)
        calls = sorted({(i, call) for i, call, *_ in handle.handler.seen}, reverse=True)
    assert calls == [(1, 1), (1, 0), (0, 1), (0, 0)]
    with stepcache.apply(pipe, FORA(1)) as handle:
        assert torch.equal(run_flux(pipe, cfg=3.0, steps=2), base)
        assert handle.stats().nfe == 4


def test_bare_transformer_needs_a_clock():
    pipe = build_pixart()
    tr = pipe.transformer
    x = torch.randn(1, 4, 8, 8)
    kw = dict(encoder_hidden_states=torch.randn(1, 6, 32), timestep=torch.tensor([500]),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    base = tr(x, **kw).sample
    with stepcache.apply(tr, FORA(2)) as handle:
        with pytest.raises(ClockError):
            tr(x, **kw)
        handle.begin_run(2, 1)
        handle.set_step(StepContext(i=1, num_steps=2, t=500.0))
        assert torch.equal(tr(x, **kw).sample, base)
        assert handle.info.num_tokens == 16 and handle.info.grid == (4, 4)
    assert torch.equal(tr(x, **kw).sample, base)


def test_resolution_is_read_at_call_time():
    pipe = build_pixart()
    with stepcache.apply(pipe, NoCache()) as handle:
        run_pixart(pipe, steps=2)
        assert handle.info.num_tokens == 16
        pe = torch.randn(1, 6, 32)
        pipe(prompt=None, negative_prompt=None, prompt_embeds=pe, prompt_attention_mask=torch.ones(1, 6),
             negative_prompt_embeds=pe, negative_prompt_attention_mask=torch.ones(1, 6), height=128, width=64,
             num_inference_steps=2, output_type="latent", use_resolution_binning=False)
        assert handle.info.num_tokens == 32 and handle.info.grid == (8, 4)
        assert handle.stats().num_tokens == 32


def test_unsupported_model_raises_listing_supported():
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8,), norm_num_groups=4,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), layers_per_block=1)
    with pytest.raises(UnsupportedModelError, match="PixArtTransformer2DModel"):
        stepcache.apply(unet, FORA(2))


def test_diffusers_cache_is_refused_both_ways():
    from diffusers import FirstBlockCacheConfig

    tr = build_flux().transformer
    tr.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ConfigError, match="diffusers"):
        stepcache.apply(tr, FORA(2))
    tr.disable_cache()
    handle = stepcache.apply(tr, FORA(2))
    with pytest.raises(ConfigError, match="stepcache"):
        tr.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    handle.remove()
    tr.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    assert tr.is_cache_enabled


# ------------------------------------------------------------------------------ ToCa on joint-attention families
TOCA_JOINT = {"sd3": (build_sd3, run_sd3), "flux": (build_flux, run_flux)}


@pytest.mark.parametrize("name", list(TOCA_JOINT))
def test_toca_kv_norm_runs_on_joint_families_and_r0_is_fora(name):
    from stepcache import ToCa

    build, run = TOCA_JOINT[name]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    base = run(pipe)
    with stepcache.apply(pipe, ToCa(interval=2, fresh_ratio=0.3, schedule="constant", score="kv-norm")) as handle:
        out = run(pipe)
        stats = handle.stats()
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-7
    assert stats.full_steps() == [2, 0] and stats.macs_executed < stats.macs_uncached
    with stepcache.apply(pipe, FORA(2)):
        fora = run(pipe)
    with stepcache.apply(pipe, ToCa(interval=2, fresh_ratio=0.0, score="kv-norm")):
        assert torch.equal(run(pipe), fora)
    assert not torch.equal(out, fora)  # the partial step recomputed some image tokens


def test_toca_map_score_on_sd3_raises_naming_usable_scores():
    from stepcache import ToCa

    pipe = build_sd3()
    with pytest.raises(ConfigError, match="kv-norm"):
        stepcache.apply(pipe, ToCa(score="attention"))
    assert all("forward" not in m.__dict__ for m in pipe.transformer.modules())


def test_toca_state_is_kept_per_model_call():
    """FLUX true CFG calls the model twice per step: each call has its own staleness counters."""
    from stepcache.core.context import ModelInfo, RunInfo
    from stepcache.core.harness import PolicyDriver
    from stepcache.policies.toca import ToCa

    info = ModelInfo(depth=1, num_tokens=4, grid=(2, 2), branches=("attn", "mlp", "context_mlp"),
                     family="diffusers.FluxTransformer2DModel")
    handler = PolicyDriver(ToCa(interval=3, fresh_ratio=0.5, schedule="constant", score="norm", bonus=0), info)
    handler.reset(RunInfo(num_steps=3, batch=1))
    actions = []
    for i in (2, 1):
        for call in (0, 1):
            ctx = StepContext(i, 3, call=call)
            attn = handler.decide(ctx, 0, "attn")
            mlp = handler.decide(ctx, 0, "mlp", x=torch.randn(1, 4, 8), cached=torch.randn(1, 4, 8))
            actions.append((attn, mlp, handler.decide(ctx, 0, "context_mlp")))
    assert [a[2] for a in actions] == [COMPUTE, COMPUTE, REUSE, REUSE]
    assert all(isinstance(a[1], Partial) and a[1].index.shape == (1, 2) for a in actions[2:])
    counters = [handler.call_state(1).counters[0], handler.call_state(0).counters[0]]
    assert [int(c.max()) for c in counters] == [1, 1] and [int(c.sum()) for c in counters] == [2, 2]


def test_toca_dit_variant_on_pixart_shares_cross_tokens_with_mlp_and_r0_is_fora():
    from stepcache import ToCa

    pipe = build_pixart()
    pipe.set_progress_bar_config(disable=True)
    policy = ToCa(interval=2, fresh_ratio=0.3, schedule="constant", score="attention", variant="dit")
    with stepcache.apply(pipe, policy) as handle:
        decide, chosen = handle.handler.decide, {}

        def record(ctx, site, view):
            action = decide(ctx, site, view)
            chosen.setdefault((ctx.i, site.layer, site.name), action)
            return action

        handle.handler.decide = record
        out = run_pixart(pipe)
    assert chosen[(1, 0, "attn")] is REUSE and isinstance(chosen[(1, 0, "cross")], Partial)
    assert chosen[(1, 0, "cross")].index.shape == (2, 4)  # CFG rows, int(0.3 * 16) tokens
    assert torch.equal(chosen[(1, 0, "mlp")].index, chosen[(1, 0, "cross")].index)
    with stepcache.apply(pipe, FORA(2)):
        fora = run_pixart(pipe)
    for variant in ("dit", "pixart"):
        with stepcache.apply(pipe, ToCa(interval=2, fresh_ratio=0.0, variant=variant)):
            assert torch.equal(run_pixart(pipe), fora)
    assert torch.isfinite(out).all() and not torch.equal(out, fora)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_toca_noop_equals_uncached(name):
    """interval=1 computes every step in full: the output is the plain model's, bit for bit (the
    scores' maps and value norms are computed beside diffusers' own attention)."""
    from stepcache import ToCa

    build, run = FAMILIES[name]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    base = run(pipe)
    policy = ToCa(interval=1) if name == "pixart" else ToCa(interval=1, score="kv-norm")
    with stepcache.apply(pipe, policy) as handle:
        assert torch.equal(run(pipe), base)
        assert handle.stats().ideal_speedup == 1.0


# ------------------------------------------------------------------------------ ToCa, PixArt variant
def _pixart_ratio(fresh_ratio, p, S, layer, depth, module):
    """The reference's PixArt "ToCa" schedule, in its operation order."""
    step_factor = 1 - (-0.9) + 2 * (-0.9) * p / S
    layer_factor = 1 + 0.6 - 2 * 0.6 * layer / (depth - 1)
    module_factor = (1 - (1 - 0.6) * 1.0) if module == "cross" else (1 + 0.6 * 1.0)
    return fresh_ratio * layer_factor * step_factor * module_factor


def _bonus_4x4(score, side, ratio=0.4):
    """The arg-max token of every 4x4 cell (row-major token grid) gets + max * ratio, cell by cell."""
    out = score.clone()
    for r in range(score.shape[0]):
        for cy in range(0, side, 4):
            for cx in range(0, side, 4):
                cell = [(cy + y) * side + cx + x for y in range(4) for x in range(4)]
                values = score[r, cell]
                j = int(values.argmax())
                out[r, cell[j]] += values[j] * ratio
    return out


@pytest.mark.parametrize("rows,S,N,full_p", [((0, 1), 8, 2, {0, 2, 4, 6}), ((0,), 10, 3, {0, 6, 9})])
def test_toca_pixart_variant_follows_the_reference_rules(rows, S, N, full_p):
    """Replays a run against an independent transcription of the reference's PixArt cache logic:
    full/partial blocks (steps counting up, interval round(N / (0.8 + 0.4 p/S))), per-module k,
    the cross-attention-entropy score of the averaged CFG halves (packed captions) with staleness and the 4x4 bonus,
    the same tokens for both halves, and the cross map refreshed row by row on partial steps."""
    from stepcache import ToCa

    pipe = build_pixart()
    pipe.set_progress_bar_config(disable=True)
    side, R = 8, 0.3
    events = []
    with stepcache.apply(pipe, ToCa(interval=N)) as handle:
        handler = handle.handler
        assert handler.pixart and handler.config.fresh_ratio == 0.30 and handler.config.bonus_grid == 4
        decide, observe = handler.decide, handler.observe

        def record_decide(ctx, site, view):
            action = decide(ctx, site, view)
            events.append(("decide", ctx.num_steps - 1 - ctx.i, site.layer, site.name, action))
            return action

        def record_observe(ctx, site, result):
            observe(ctx, site, result)
            if result.attn_map is not None:
                events.append(("map", site.layer, site.name, result.attn_map.clone(), result.index))

        handler.decide, handler.observe = record_decide, record_observe
        pe, ne = _embeds(rows, 6, 32, 0)[0], _embeds(rows, 6, 32, 50)[0]
        mask = torch.ones(len(rows), 6)
        mask[:, 4:] = 0
        out = pipe(prompt=None, negative_prompt=None, prompt_embeds=pe, prompt_attention_mask=mask,
                   negative_prompt_embeds=ne, negative_prompt_attention_mask=torch.ones(len(rows), 6),
                   height=128, width=128, latents=_latents(rows, (4, 2 * side, 2 * side)), num_inference_steps=S,
                   guidance_scale=4.5, output_type="latent", use_resolution_binning=False).images
    assert torch.isfinite(out).all()

    depth, T = 2, side * side
    threshold, maps, counters, full_blocks, partial_k = N, {}, {}, set(), set()
    for event in events:
        if event[0] == "map":
            _, layer, branch, m, index = event
            if index is None:
                maps[layer] = m.clone()
            else:
                maps[layer].scatter_(1, index.unsqueeze(-1).expand(-1, -1, m.shape[-1]), m)
            continue
        _, p, layer, branch, action = event
        if branch == "attn":
            used = N if p == 0 else threshold
            full = p == 0 or p % used == 0
            assert (action.kind == "compute") is full, (p, layer)
            if full:
                full_blocks.add((p, layer))
                threshold = int(torch.round(N / torch.tensor(1 - 0.2 + 2 * 0.2 * p / S)))
            continue
        if (p, layer) in full_blocks:
            assert action.kind == "compute" and action.need_map is (branch == "cross")
            counters[(layer, branch)] = torch.zeros(2 * len(rows), T, dtype=torch.int32)
            continue
        assert action.kind == "partial" and action.need_map is (branch == "cross")
        k = int(torch.clamp(torch.tensor(_pixart_ratio(R, p, S, layer, depth, branch)), 0, 1) * T)
        # the reference averages maps over the packed captions of the batch, zero outside a row's own caption:
        # the two halves' maps end up side by side, each weighted 0.5
        half_map = torch.cat([0.5 * maps[layer][:len(rows)], 0.5 * maps[layer][len(rows):]], dim=-1)
        entropy = -torch.sum(half_map * torch.log(half_map + 1e-7), dim=-1)
        score = torch.nn.functional.normalize(1 + entropy, dim=1).repeat(2, 1)
        score = score + 0.25 * (counters[(layer, branch)].float() / N)
        score = _bonus_4x4(score, side)
        expected = score.argsort(dim=-1, descending=True)[:, :k]
        assert torch.equal(action.index, expected), (p, layer, branch)
        assert torch.equal(action.index[:len(rows)], action.index[len(rows):])  # same tokens, both CFG halves
        counters[(layer, branch)] += 1
        counters[(layer, branch)].scatter_(1, expected, 0)
        partial_k.add((branch, k))
    assert {p for p, layer in full_blocks if layer == 1} == full_p and (1, 0) not in full_blocks
    assert {k for b, k in partial_k if b == "cross"} and max(k for b, k in partial_k if b == "mlp") > max(
        k for b, k in partial_k if b == "cross")


def test_toca_variant_settings_are_checked():
    from stepcache import ToCa
    from stepcache.core.context import ModelInfo
    from stepcache.policies.toca import ToCaPolicy as ToCaHandler

    pixart = ModelInfo(depth=2, num_tokens=16, grid=(4, 4), branches=("attn", "cross", "mlp"),
                       family="diffusers.PixArtTransformer2DModel", variant="pixart",
                       capabilities=frozenset({"attention_map"}))
    dit = ModelInfo(depth=2, num_tokens=16, grid=(4, 4), branches=("attn", "mlp"),
                    capabilities=frozenset({"attention_map"}))
    assert ToCaHandler(ToCa(), dit).config.fresh_ratio == 0.07
    assert ToCaHandler(ToCa(fresh_ratio=0.2, bonus=0.0), pixart).config.schedule == "ToCa-pixart"
    for bad, info in ((ToCa(schedule="ToCa-ddim50"), pixart), (ToCa(score="compress"), pixart),
                      (ToCa(schedule="ToCa-pixart"), dit), (ToCa(variant="pixart"), dit)):
        with pytest.raises(ConfigError):
            ToCaHandler(bad, info)
    with pytest.raises(ConfigError):
        ToCa(variant="sd3")


# ------------------------------------------------------------------------------ L2C-style routing
@pytest.mark.parametrize("name", list(FAMILIES))
def test_l2c_router_on_every_family(name):
    """A router that keeps every unit equals the uncached pipeline bit for bit; one that reuses every
    routed unit on cache steps changes the output and skips work; a router for another depth is refused."""
    from stepcache import L2C
    from stepcache.adapters import find_adapter
    from stepcache.errors import ModelMismatchError

    build, run = FAMILIES[name]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    base = run(pipe, steps=4)
    target, adapter = find_adapter(pipe)
    depth = adapter.info(target).depth
    with stepcache.apply(pipe, L2C(router=[[10.0] * (2 * depth)] * 4)) as handle:
        assert torch.equal(run(pipe, steps=4), base)
        assert handle.stats().ideal_speedup == 1.0
    with stepcache.apply(pipe, L2C(router=[[-10.0] * (2 * depth)] * 4)) as handle:
        out = run(pipe, steps=4)
        stats = handle.stats()
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert stats.macs_executed < stats.macs_uncached
    with pytest.raises(ModelMismatchError):
        stepcache.apply(pipe, L2C(router=[[0.0] * (2 * depth + 2)] * 4))
    with stepcache.apply(pipe, L2C(router=[[0.0] * (2 * depth)] * 6)):  # made for 6 steps
        with pytest.raises(ModelMismatchError):
            run(pipe, steps=4)
    assert torch.equal(run(pipe, steps=4), base)


def test_sd3_skip_layer_guidance_call_runs_uncached():
    """SD3's skip-layer guidance calls the transformer again on the cond rows with ``skip_layers``:
    that call bypasses the policy, so FORA(1) still equals the plain pipeline and FORA(2) runs."""
    pipe = build_sd3()
    pipe.set_progress_bar_config(disable=True)
    pe, ne = _embeds((0,), 6, 32, 0)[0], _embeds((0,), 6, 32, 50)[0]
    pp = torch.randn(1, 32, generator=torch.Generator().manual_seed(7))

    def run(steps=4):
        return pipe(prompt=None, prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pp,
                    negative_pooled_prompt_embeds=-pp, height=64, width=64, latents=_latents((0,), (4, 8, 8)),
                    num_inference_steps=steps, guidance_scale=5.0, output_type="latent", skip_guidance_layers=[1],
                    skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0).images

    base = run()
    with stepcache.apply(pipe, FORA(1)) as handle:
        assert torch.equal(run(), base)
        assert handle.stats().nfe == 4 + 3 and handle.stats().ideal_speedup == 1.0  # SLG on steps 1..3
    with stepcache.apply(pipe, FORA(2)) as handle:
        out = run()
        stats = handle.stats()
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert stats.full_steps() == [3, 2, 0] and stats.macs_executed < stats.macs_uncached


@pytest.mark.parametrize("name", ["dit", "pixart", "sd3"])
def test_norms_feeding_a_reused_branch_are_skipped_without_changing_the_output(name, monkeypatch):
    """A LayerNorm whose output only feeds a reused site returns one token instead of all; the block's
    modulation broadcasts it and the reused site never reads it: outputs are bit-identical."""
    from stepcache.adapters.diffusers.common import DiffusersAdapter

    build, run = FAMILIES[name]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    norms = {"dit": "norm3", "pixart": "norm2", "sd3": "norm2"}[name]
    widths = []
    hook = getattr(pipe.transformer.transformer_blocks[0], norms).register_forward_hook(
        lambda _m, _i, out: widths.append(out.shape[1]))
    with stepcache.apply(pipe, FORA(2)):
        fast = run(pipe)
    skipped, widths[:] = list(widths), []
    monkeypatch.setattr(DiffusersAdapter, "skip_unused_norms", False)
    with stepcache.apply(pipe, FORA(2)):
        slow = run(pipe)
    hook.remove()
    assert torch.equal(fast, slow)
    assert 1 in skipped and 1 not in widths  # the reuse step (i = 1) skipped the norm


# ------------------------------------------------------------------------------ spans of blocks (engine v2)
def test_spans_of_blocks_on_every_family(family):
    """A span computed at every step equals the plain pipeline bit for bit; a reused span changes the output,
    skips its blocks' branches and saves work; remove() restores every block forward."""
    from test_engine import SpanProbe

    name, pipe, run, base = family
    depth = len(stepcache.api.find_adapter(pipe)[1].blocks(pipe.transformer))
    spans = ((0, 1), (1, depth))
    with stepcache.apply(pipe, SpanProbe(spans_=spans, every=1)):
        assert torch.equal(run(pipe), base)
    with stepcache.apply(pipe, SpanProbe(spans_=spans, every=2)) as handle:
        out = run(pipe)
        stats = handle.stats()
        observed = handle.handler.observed
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-7
    assert stats.macs_executed < stats.macs_uncached and stats.kind_counts()["reuse"] == 1
    assert {site.end for _, site, _, _ in observed} == {1, depth}
    assert all(o == x for _, _, o, x in observed)  # residual shaped like the stream it applies to
    assert all("forward" not in m.__dict__ for m in pipe.transformer.modules())
    assert torch.equal(run(pipe), base)


# ------------------------------------------------------------------------------ the diffusers habits (issue 12)
def test_apply_to_pipe_transformer_then_call_the_pipeline(family, monkeypatch):
    """``stepcache.apply(pipe.transformer, policy)`` then ``pipe(...)``: the same as applying to the pipeline, whether
    the pipeline is found at apply time (it holds the transformer) or at the first call (from the calling frame)."""
    from stepcache.adapters.diffusers import clock

    name, pipe, run, base = family
    with stepcache.apply(pipe, FORA(2)):
        want = run(pipe)
    with stepcache.apply(pipe.transformer, FORA(2)) as handle:
        assert torch.equal(run(pipe), want) and handle.stats().nfe == STEPS
        assert torch.equal(run(pipe), want)  # a second call starts a fresh run
    assert type(pipe).__name__ == type(pipe).__mro__[0].__name__ and "_stepcache_clock" not in pipe.__dict__
    monkeypatch.setattr(clock, "find_pipeline", lambda transformer: None)
    with stepcache.apply(pipe.transformer, FORA(2)) as handle:
        assert handle.clock is None
        assert torch.equal(run(pipe), want)  # adopted from the stack at the first call
        assert torch.equal(run(pipe), want)
    assert "_stepcache_clock" not in pipe.__dict__ and torch.equal(run(pipe), base)


def test_clock_accepts_a_bfloat16_timestep():
    from stepcache.adapters.diffusers.clock import _tolerance

    expected = 928.571
    t = float(torch.tensor(expected / 1000, dtype=torch.bfloat16)) * 1000  # FLUX's t / 1000 in bf16
    assert abs(t - expected) > 1e-3 * expected  # the old check refused it
    assert abs(t - expected) <= _tolerance(torch.tensor([0.5], dtype=torch.bfloat16), expected)
    assert _tolerance(torch.tensor([0.5]), expected) == pytest.approx(1e-3 * expected)


def test_flux_in_bfloat16_runs_cached():
    pipe = build_flux()
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.to(torch.bfloat16)
    bf = torch.bfloat16

    def run():
        pe, pp = _embeds((0,), 6, 32, 0)[0].to(bf), torch.randn(1, 32, generator=torch.Generator().manual_seed(7))
        return pipe(prompt=None, prompt_embeds=pe, pooled_prompt_embeds=pp.to(bf), height=64, width=64,
                    latents=_latents((0,), (16, 16)).to(bf), num_inference_steps=6, output_type="latent").images

    base = run()
    with stepcache.apply(pipe, FORA(1)):
        assert torch.equal(run(), base)
    with stepcache.apply(pipe, FORA(3)) as handle:
        out = run()
    assert torch.isfinite(out.float()).all() and handle.stats().full_steps() == [5, 3, 0]


@pytest.mark.parametrize("name", ["pixart", "sd3"])
def test_coexists_with_layerwise_casting_and_group_offload(name):
    build, run = FAMILIES[name]
    for enable in ("layerwise", "offload"):
        pipe = build()
        pipe.set_progress_bar_config(disable=True)
        if enable == "layerwise":
            pipe.transformer.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
        else:
            pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level",
                                                  num_blocks_per_group=1)
        base = run(pipe)
        with stepcache.apply(pipe, FORA(1)):
            assert torch.equal(run(pipe), base)
        with stepcache.apply(pipe, FORA(2)) as handle:
            out = run(pipe)
        assert torch.isfinite(out).all() and handle.stats().macs_executed < handle.stats().macs_uncached
        assert torch.equal(run(pipe), base)
