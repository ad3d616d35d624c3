"""Lean reuse steps on the native DiT: same bits as the plain path, nobody's tensor updated in place,
adaLN work skipped and bytes moved counted exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from helpers import hand_fora_pass, tiny_dit

import stepcache
from stepcache import FORA, L2C, ToCa, sample
from stepcache.core import policy as policy_module
from stepcache.core.actions import COMPUTE, REUSE
from stepcache.core.policy import Policy, PolicyConfig, register_policy
from stepcache.policies.dbcache import DBCache
from stepcache.policies.fbcache import FBCache
from stepcache.policies.forecast import Forecast, newton_eval, newton_update
from stepcache.policies.taylorseer import TaylorSeer, forecast, update_factors

STEPS = 8
POLICIES = {
    "fora": lambda: FORA(3),
    "toca": lambda: ToCa(3, 0.25),
    "taylorseer": lambda: TaylorSeer(interval=3, order=2, warmup=1),
    "forecast": lambda: Forecast(num_full=4, power=1.0, order=2),
    "l2c": lambda: L2C(torch.randn(STEPS, 6, generator=torch.Generator().manual_seed(3)) * 2, 0.3),
    "fbcache": lambda: FBCache(0.5),
    "dbcache": lambda: DBCache(front=1, threshold=0.5, warmup=2),
}


def _run(model, policy, lean: bool, steps: int = STEPS, sampler: str = "ddim", calls: list | None = None):
    """Sample; ``calls`` collects the model's output at every call (the final latents alone can round a
    last-bit difference of a reuse step away)."""
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([3, 7])
    hook = model.register_forward_hook(lambda m, args, out: calls.append(out.clone())) if calls is not None else None
    try:
        with stepcache.apply(model, policy) as handle:
            handle.lean = lean
            torch.manual_seed(1)
            out = sample(model, z, y, steps, sampler, 1.5)
            return out, handle.stats(), handle
    finally:
        if hook is not None:
            hook.remove()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_lean_path_gives_the_plain_paths_bits(name):
    model = tiny_dit(depth=3)
    plain_calls, lean_calls = [], []
    plain, plain_stats, _ = _run(model, POLICIES[name](), lean=False, calls=plain_calls)
    lean, stats, handle = _run(model, POLICIES[name](), lean=True, calls=lean_calls)
    assert torch.equal(lean, plain)
    assert len(lean_calls) == len(plain_calls) == STEPS
    assert all(torch.equal(a, b) for a, b in zip(lean_calls, plain_calls))  # every call, bit for bit
    assert stats.macs_uncached == plain_stats.macs_uncached
    assert stats.kind_counts() == plain_stats.kind_counts()
    assert not handle._scratch  # work buffers are freed with the run


def test_lean_fora_reuse_steps_really_skip(one_thread):
    model = tiny_dit(depth=3)
    _, stats, _ = _run(model, FORA(3), lean=True)
    assert stats.kind_counts()["reuse"] > 0 and stats.macs_fixed_skipped > 0


@pytest.mark.parametrize("name", ["fora", "l2c"])
def test_adaln_work_skipped_is_counted_exactly(name):
    """Per block and row: 4 D^2 when both branches are reused (only the two gates), 2 D^2 when only the
    attention is (the MLP still needs its shift and scale); nothing when the attention computes."""
    model = tiny_dit(depth=3)
    D, rows = 64, 4
    _, plain, _ = _run(model, POLICIES[name](), lean=False)
    _, lean, _ = _run(model, POLICIES[name](), lean=True)
    expected = 0
    for kinds in lean.kinds.values():
        for layer in range(3):
            attn, mlp = kinds[f"{layer}.attn"], kinds[f"{layer}.mlp"]
            if attn in ("reuse", "forecast"):
                expected += rows * (4 if mlp in ("reuse", "forecast") else 2) * D * D
    assert expected > 0
    assert lean.macs_fixed_skipped == expected
    assert plain.macs_fixed_skipped == 0
    assert plain.macs_executed - lean.macs_executed == expected
    assert lean.macs_uncached == plain.macs_uncached


@pytest.mark.parametrize("name", ["toca", "l2c"])
def test_mixed_blocks_are_exercised(name):
    """ToCa's partial steps and L2C's per-branch routes reach the lean path with a computed MLP."""
    model = tiny_dit(depth=3)
    _, stats, _ = _run(model, POLICIES[name](), lean=True)
    mixed = [(i, l) for i, k in stats.kinds.items() for l in range(3)
             if k[f"{l}.attn"] == "reuse" and k[f"{l}.mlp"] in ("full", "partial")]
    assert mixed


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_lean_fora_equals_the_plain_block_arithmetic_bitwise(sampler):
    """The lean path against DiT's block arithmetic written out by hand (``x + gate * a``, the full adaLN),
    driven by the same sampler through an instance ``forward``: FORA(2) refreshes at i = S-1 and even i."""
    model, steps = tiny_dit(depth=2), 6
    lean, _, _ = _run(model, FORA(2), lean=True, sampler=sampler, steps=steps)
    cache, calls = {}, iter(range(steps - 1, -1, -1))

    def forward(x, t, y):
        i = next(calls)
        return hand_fora_pass(model, x, t, y, cache, refresh=i == steps - 1 or i % 2 == 0)

    model.forward = forward
    try:
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        ref = sample(model, z, torch.tensor([3, 7]), steps, sampler, 1.5)
    finally:
        del model.forward
    assert next(calls, None) is None
    assert torch.equal(lean, ref)


# ---------------------------------------------------------------------------------- in-place safety
@dataclass(frozen=True)
class Hold(PolicyConfig):
    method: ClassVar[str] = "lean_test_hold"


class HoldPolicy(Policy):
    """Reuses the attention of every block at odd steps, always computes the MLP (so its input, the stream
    after a lean in-place gated add, is shown to the policy), keeps every tensor it is shown with a copy,
    and checks at every decision that none of them has changed since."""

    needs_input = ("mlp",)
    kept: ClassVar[list] = []

    def decide(self, ctx, site, view):
        for held, copy in HoldPolicy.kept:
            assert torch.equal(held, copy), f"a tensor shown to the policy was changed at {site}, step {ctx.i}"
        if site.name == "mlp":
            HoldPolicy.kept.append((view.input, view.input.clone()))
            return COMPUTE
        return REUSE if ctx.i % 2 == 1 and view.cached is not None else COMPUTE

    def observe(self, ctx, site, result):
        for t in (result.input, result.output):
            HoldPolicy.kept.append((t, t.clone()))


@pytest.fixture
def hold_registered():
    """Register the test policy for one test only (the registry is the CLI's menu)."""
    register_policy(Hold)(HoldPolicy)
    yield
    policy_module._HANDLERS.pop(Hold, None)
    policy_module._BY_NAME.pop(Hold.method, None)


def test_no_tensor_shown_to_a_policy_is_updated_in_place(hold_registered):
    HoldPolicy.kept = []
    model = tiny_dit(depth=3)
    lean, stats, _ = _run(model, Hold(), lean=True)
    plain, _, _ = _run(model, Hold(), lean=False)
    assert torch.equal(lean, plain) and stats.macs_fixed_skipped > 0
    assert len(HoldPolicy.kept) > 20
    for held, copy in HoldPolicy.kept:
        assert torch.equal(held, copy)
    HoldPolicy.kept = []


def test_block_outputs_seen_by_forward_hooks_stay_intact():
    model = tiny_dit(depth=3)
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append((out, out.clone()))) for b in model.blocks]
    try:
        lean, stats, _ = _run(model, FORA(2), lean=True)
    finally:
        for h in hooks:
            h.remove()
    plain, _, _ = _run(model, FORA(2), lean=False)
    assert torch.equal(lean, plain) and stats.kind_counts()["reuse"] > 0
    assert all(torch.equal(out, copy) for out, copy in seen)


def test_cached_outputs_are_never_updated_in_place():
    """Every cached branch output keeps the value it was computed with through its reuse steps."""
    model = tiny_dit(depth=2)
    outs = []
    hooks = [m.register_forward_hook(lambda mod, args, out: outs.append((out, out.clone())))
             for b in model.blocks for m in (b.attn, b.mlp)]
    try:
        _, stats, _ = _run(model, FORA(4), lean=True)
    finally:
        for h in hooks:
            h.remove()
    assert stats.kind_counts()["reuse"] > 0 and outs
    assert all(torch.equal(out, copy) for out, copy in outs)


# ---------------------------------------------------------------------------------- bytes moved
def test_bytes_moved_by_fora_equal_a_hand_count():
    """FORA(2), DDIM-6, 3 blocks: every site stores its output at a full step and reads it at a reuse step."""
    model = tiny_dit(depth=3)
    _, stats, _ = _run(model, FORA(2), lean=True, steps=6)
    u = 4 * 16 * 64 * 4  # rows x tokens x width x float32
    sites = 2 * 3
    full = stats.kind_counts()["full"]
    reuse = stats.kind_counts()["reuse"]
    assert (full, reuse) == (4, 2)  # i = 5 (first), 4, 2, 0 refresh
    moved = stats.bytes_by_kind()
    assert moved["written"] == {"full": full * sites * u, "partial": 0, "reuse": 0, "forecast": 0}
    assert moved["read"] == {"full": 0, "partial": 0, "reuse": reuse * sites * u, "forecast": 0}
    assert stats.as_dict()["bytes_read"]["reuse"] == reuse * sites * u


def test_bytes_moved_by_taylorseer_equal_a_hand_count():
    """TaylorSeer(interval=2, order=1, warmup=1), 6 steps: full at s = 0, 2, 4, forecast at 1, 3, 5.
    Per site (u = one feature): s=0 stores F0 (w u); s=1 reads [F0], writes the output (r u, w u);
    s=2 stores (w u) and updates [F0] -> [F0', F1] (r u, w u); s=3 reads [F0, F1] (r 2u, w u);
    s=4 stores (w u) and updates [F0, F1] -> [F0', F1'] with F1' in F1's buffer (r 2u, w u);
    s=5 reads [F0, F1] (r 2u, w u)."""
    model = tiny_dit(depth=3)
    _, stats, _ = _run(model, TaylorSeer(interval=2, order=1, warmup=1), lean=True, steps=6)
    u, sites = 4 * 16 * 64 * 4, 2 * 3
    assert stats.kind_counts() == {"full": 3, "partial": 0, "reuse": 0, "forecast": 3}
    moved = stats.bytes_by_kind()
    assert moved["read"]["full"] == (0 + 1 + 2) * u * sites
    assert moved["written"]["full"] == (1 + 2 + 2) * u * sites
    assert moved["read"]["forecast"] == (1 + 2 + 2) * u * sites
    assert moved["written"]["forecast"] == 3 * u * sites


def test_summary_shows_bytes_and_skipped_adaln_in_scaled_units():
    model = tiny_dit(depth=3)
    _, _, handle = _run(model, FORA(2), lean=True, steps=6)
    table = handle.summary(details=True)
    assert "bytes moved" in table and "KiB" in table and "adaLN skipped" in table
    assert "bytes read / written" in table


# ---------------------------------------------------------------------------------- lean forecast math
def _features(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 5, 8, generator=g) for _ in range(n)]


def _naive_taylor(factors, x):
    out = factors[0]
    for k in range(1, len(factors)):
        term = factors[1] * x if k == 1 else (1 / [1, 1, 2, 6, 24][k]) * factors[k] * x ** k
        out = out + term
    return out


@pytest.mark.parametrize("order", [1, 2, 3])
def test_recycled_taylor_factors_and_forecasts_are_bitwise_the_plain_ones(order):
    plain, lean = [], []
    steps = (0, 1, 3, 4, 6, 8)
    for s, last, f in zip(steps, (None, *steps), _features(6)):
        distance = 0 if last is None else s - last
        plain = update_factors(plain, f, distance, order, difference=bool(plain), dtype=None)
        lean = update_factors(lean, f, distance, order, difference=bool(lean), dtype=None, recycle=True)
        assert len(plain) == len(lean) and all(torch.equal(a, b) for a, b in zip(plain, lean))
        for x in (1, 2, 5):
            assert torch.equal(forecast(lean, x, torch.float32), _naive_taylor(plain, x))
    assert lean[0] is f  # F0 is the computed feature, never a recycled buffer


@pytest.mark.parametrize("order", [1, 2, 3])
def test_recycled_newton_coefficients_and_horner_are_bitwise_the_plain_ones(order):
    plain, lean, zp, zl = [], [], [], []
    for s, f in zip((0, 1, 3, 4, 7), _features(5, seed=1)):
        plain, zp = newton_update(plain, zp, f, s, order)
        lean, zl = newton_update(lean, zl, f, s, order, recycle=True)
        assert zp == zl and all(torch.equal(a, b) for a, b in zip(plain, lean))
        for t in (s + 1, s + 2):
            ref = plain[-1]
            for j in range(len(plain) - 2, -1, -1):
                ref = torch.add(plain[j], ref, alpha=t - zp[j])
            assert torch.equal(newton_eval(lean, zl, t), ref)


def _addcmul_fuses() -> bool:
    """Whether this CPU's ``addcmul`` rounds once (FMA): then it differs from ``x + g * a`` somewhere."""
    gen = torch.Generator().manual_seed(0)
    x, g, a = (torch.randn(4, 64, 64, generator=gen) for _ in range(3))
    return not torch.equal(torch.addcmul(x, g, a), x + g * a)


@pytest.mark.parametrize("name", ["fora", "taylorseer", "forecast"])
def test_fused_gated_adds_round_once_and_change_nothing_else(name):
    """``handle.lean = "fused"``: reused branches are added with one ``addcmul`` (one rounding), so the output
    moves by a few ulps from the plain path, and by no more; the work and the decisions are the lean path's."""
    model = tiny_dit(depth=3)
    lean_calls, fused_calls = [], []
    lean, lean_stats, _ = _run(model, POLICIES[name](), lean=True, calls=lean_calls)
    fused, stats, handle = _run(model, POLICIES[name](), lean="fused", calls=fused_calls)
    assert torch.equal(lean_calls[0], fused_calls[0])  # a full first step: same bits
    if _addcmul_fuses():  # the fused adds ran (an FMA rounds differently); a CPU without FMA gives the same bits
        assert any(not torch.equal(a, b) for a, b in zip(lean_calls, fused_calls))
    for a, b in zip(lean_calls, fused_calls):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, lean, rtol=1e-5, atol=1e-5)
    assert stats.kind_counts() == lean_stats.kind_counts()
    assert (stats.macs_executed, stats.macs_fixed_skipped) == (lean_stats.macs_executed, lean_stats.macs_fixed_skipped)
    assert not handle._scratch


@pytest.mark.parametrize("value", [1, 0, "yes", None, "FUSED"])
def test_lean_accepts_true_false_or_fused_only(value):
    model = tiny_dit(depth=2)
    with stepcache.apply(model, FORA(2)) as handle:
        with pytest.raises(stepcache.errors.ConfigError, match="handle.lean"):
            handle.lean = value
        assert handle.lean is True
