"""The v2 contract on the native DiT: spans, Emit, observed outputs, per-call state, memory accounting."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import stepcache
from stepcache import FORA, NoCache, sample
from stepcache.core.actions import COMPUTE, REUSE, Emit
from stepcache.core.context import SiteKey
from stepcache.core.policy import Policy, PolicyConfig, register_policy
from stepcache.errors import ConfigError
from helpers import tiny_dit


@dataclass(frozen=True)
class SpanProbe(PolicyConfig):
    """Test policy: spans ``spans``; a span reuses (or emits its cached residual) on steps where
    ``progress % every != 0``; records what it observed."""

    spans_: tuple = ((0, 4),)
    every: int = 2
    emit: bool = False
    method: ClassVar[str] = "test-span-probe"


@register_policy(SpanProbe)
class SpanProbePolicy(Policy):
    def spans(self):
        return self.config.spans_

    def reset(self, run):
        super().reset(run)
        self.observed = []

    def decide(self, ctx, site, view):
        if not site.is_span or ctx.progress % self.config.every == 0:
            return COMPUTE
        if self.config.emit:
            return Emit(view.cached.clone(), macs=7)
        return REUSE

    def observe(self, ctx, site, result):
        if site.is_span:
            self.observed.append((ctx.i, site, result.output.shape, result.input.shape))


@dataclass(frozen=True)
class EmitCached(PolicyConfig):
    """Emit the cached output on FORA's reuse steps: must equal FORA bit for bit."""

    interval: int = 3
    method: ClassVar[str] = "test-emit-cached"


@register_policy(EmitCached)
class EmitCachedPolicy(Policy):
    def decide(self, ctx, site, view):
        if ctx.is_first or ctx.i % self.config.interval == 0:
            return COMPUTE
        return Emit(view.cached)


def _run(model, policy, steps=8, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 4, 8, 8, generator=g)
    labels = torch.arange(n)
    return sample(model, noise, labels, num_steps=steps, sampler="ddim", cfg_scale=1.5, policy=policy,
                  return_stats=True)


def test_span_computed_everywhere_equals_uncached_bit_for_bit(one_thread):
    model = tiny_dit()
    base, _ = _run(model, NoCache())
    out, stats = _run(model, SpanProbe(spans_=((0, 2), (2, 4)), every=1))
    assert torch.equal(out, base) and stats.mac_ratio == 1.0


def test_reused_span_skips_its_blocks_and_counts_exactly(one_thread):
    model = tiny_dit()
    base, full = _run(model, NoCache())
    with stepcache.apply(model, SpanProbe(spans_=((1, 4),), every=2)) as handle:
        out, stats = _run(model, None)
        observed = handle.handler.observed
    assert not torch.equal(out, base)
    assert [i for i, *_ in observed] == [7, 5, 3, 1]  # computed on every other step
    assert all(site == SiteKey(1, "span", 4) and o == x for _, site, o, x in observed)
    assert stats.macs_uncached == full.macs_uncached
    # 4 of 8 steps skip blocks 1..3: executed = uncached - 4 steps x 3 blocks x (attn + mlp + adaLN) work
    assert stats.kind_counts()["partial"] == 4  # block 0 computed, the span reused
    assert stats.tokens(6, "2.mlp") == 0 and stats.tokens(6, "0.mlp") == model.num_tokens
    assert stats.macs_executed < full.macs_executed


def test_emitted_span_equals_reused_span_and_counts_the_policy_work(one_thread):
    model = tiny_dit()
    reuse, rs = _run(model, SpanProbe(spans_=((0, 4),), every=3))
    emit, es = _run(model, SpanProbe(spans_=((0, 4),), every=3, emit=True))
    assert torch.equal(reuse, emit)
    assert es.macs_policy == 7 * 5 and es.macs_executed == rs.macs_executed + 35
    assert es.kind_counts()["forecast"] == 5 and rs.kind_counts()["reuse"] == 5


def test_emit_of_the_cached_branch_equals_fora(one_thread):
    model = tiny_dit()
    fora, fs = _run(model, FORA(3), steps=10)
    emit, es = _run(model, EmitCached(3), steps=10)
    assert torch.equal(fora, emit) and fs.macs_executed == es.macs_executed


def test_bad_spans_are_refused_and_leave_the_model_unpatched(one_thread):
    model = tiny_dit()
    forward = model.forward
    for spans in (((0, 9),), ((0, 3), (2, 4)), ((2, 2),)):
        with pytest.raises(ConfigError):
            stepcache.apply(model, SpanProbe(spans_=spans))
        assert stepcache.get_handle(model) is None and model.forward == forward
        assert all("forward" not in b.__dict__ for b in model.blocks)


def test_memory_is_counted_and_summary_is_a_table(one_thread):
    model = tiny_dit()
    with stepcache.apply(model, FORA(2)) as handle:
        _, stats = _run(model, None)
        table = stepcache.summary(model, details=True)
    rows, T, D = 4, model.num_tokens, 64
    assert stats.peak_cache_bytes == 2 * 4 * rows * T * D * 4  # attn + mlp of 4 layers, float32
    assert "FORA(interval=2)" in table and "cache memory" in table and "step" in table and "wall time" in table
    assert "removed" in repr(handle)
    assert stepcache.remove(model) is False  # already removed by the context manager


def test_remove_by_model_and_deepcopy_refused(one_thread):
    import copy

    model = tiny_dit()
    stepcache.apply(model, FORA(2))
    with pytest.raises(stepcache.StepcacheError):
        copy.deepcopy(model)
    assert stepcache.remove(model) is True and stepcache.get_handle(model) is None
    copy.deepcopy(model)  # fine once removed
