"""ToCa: refresh schedule and mixed steps, per-layer k, scores, row independence, FORA degeneracy."""

import math

import numpy as np
import pytest
import torch

import stepcache
from stepcache import FORA, ConfigError, NoCache, ToCa, sample
from stepcache.policies import toca_scores as S
from stepcache.core.context import ModelInfo
from stepcache.core.harness import PolicyDriver
from stepcache.core.context import RunInfo, StepContext
from helpers import tiny_dit

# The spec's all-layer refresh steps (reference implementation, fresh_ratio 0.07).
DDPM250_N4 = ([249, 240, 234, 228, 222, 216, 210] + list(range(205, 159, -5)) + list(range(152, 99, -4))
              + list(range(96, 49, -2)) + [48] + list(range(45, -1, -3)))
DDIM50_N3 = [49, 44, 40, 36, 30, 27, 24, 21, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0]


pytestmark = pytest.mark.usefixtures("one_thread")


def spec_k(schedule_weights, i, S_, layer, T, ratio=0.07):
    """k from the spec formula, computed the reference's way (torch float32 clamp, then * T)."""
    sw, lw = schedule_weights
    r = ratio * (1 + lw - 2 * lw * layer / 27) * (1 + sw - 2 * sw * i / S_) * 2.5
    return int(torch.clamp(torch.tensor(r), 0.0, 1.0) * T)


class Driver:
    """Calls a ToCa handler the way the runtime does, for a model with `depth` layers and T tokens."""

    def __init__(self, cfg, depth=28, grid=16, rows=2, cfg_rows=True, seed=0):
        self.T = grid * grid
        self.h = PolicyDriver(cfg, ModelInfo(depth=depth, num_tokens=self.T, grid=(grid, grid),
                                             branches=("attn", "mlp"), capabilities=frozenset({"attention_map"})))
        self.depth, self.rows, self.cfg_rows = depth, rows, cfg_rows
        g = torch.Generator().manual_seed(seed)
        self.maps = torch.randn(3, rows, self.T, self.T, generator=g).softmax(-1)  # reused: keeps tests fast
        self.xs = torch.randn(3, rows, self.T, 8, generator=g)

    def run(self, num_steps):
        """{i: [k per layer]} (k = T for a full MLP computation) and the partial indices."""
        self.h.reset(RunInfo(num_steps, self.rows, self.cfg_rows))
        ks, picks = {}, {}
        for i in range(num_steps - 1, -1, -1):
            ctx = StepContext(i, num_steps)
            ks[i] = []
            for layer in range(self.depth):
                act = self.h.decide(ctx, layer, "attn")
                if act.kind == "compute" and act.need_map:
                    self.h.observe(ctx, layer, "attn", attn_map=self.maps[(i + layer) % 3])
                x = self.xs[(i * 7 + layer) % 3]
                act = self.h.decide(ctx, layer, "mlp", x=x)
                ks[i].append(self.T if act.kind == "compute" else act.index.shape[1])
                if act.kind == "partial":
                    picks[i, layer] = act.index
        return ks, picks


# ------------------------------------------------------------------------ schedule
def test_ddpm250_full_and_mixed_steps_and_k():
    ks, _ = Driver(ToCa(4, 0.07, "ToCa-ddpm250")).run(250)
    T = 256
    full = [i for i in ks if all(k == T for k in ks[i])]
    mixed = [i for i in ks if ks[i][0] == T and any(k < T for k in ks[i][1:])]
    assert len(DDPM250_N4) == 72 and full == DDPM250_N4
    assert mixed == [245, 155]
    for i, layer in [(248, 0), (248, 27), (125, 13), (1, 0), (1, 27), (245, 1), (155, 27)]:
        assert ks[i][layer] == spec_k((0.4, 0.8), i, 250, layer, T), (i, layer)
    partial = [i for i in ks if i not in full + mixed]
    assert min(ks[i][0] for i in partial) == 48 and max(ks[i][0] for i in partial) == 112
    assert ks[1][27] == 12 and ks[248][27] == 5
    evals = [k for v in ks.values() for k in v]  # the spec's aggregate compute: attention 28.8 %, MLP 40.8 %
    assert round(evals.count(T) / len(evals), 3) == 0.288 and round(sum(evals) / (T * len(evals)), 3) == 0.408


def test_ddim50_steps_through_a_sampling_run():
    model = tiny_dit(depth=28, hidden=32, heads=2, input_size=4, patch=2)
    noise, labels = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2])
    _, st = sample(model, noise, labels, 50, "ddim", 1.5, ToCa(3, 0.07, "ToCa-ddim50"), return_stats=True)
    T, table = 4, st.layer_tokens("mlp")
    assert st.full_steps() == DDIM50_N3
    for i in (45, 32):  # mixed: layer 0 full, the others partial (attention reused)
        assert table[i][0] == T and st.tokens(i, "0.attn") == T
        assert all(st.tokens(i, f"{l}.attn") == 0 for l in range(1, 28))
    for i, layer in [(48, 0), (25, 5), (1, 0), (1, 27), (3, 14)]:
        assert table[i][layer] == spec_k((2.0, -0.2), i, 50, layer, T)
    assert all(k == 0 for k in table[48])  # DDIM-50: nothing recomputed in the first partial steps
    assert st.nfe == 50 and st.mac_ratio < 0.6


def test_ddim50_k_at_256_tokens_and_per_step_option():
    ks, _ = Driver(ToCa(3, 0.07, "ToCa-ddim50")).run(50)
    assert [ks[1][0], ks[1][27]] == [104, 156]
    evals = [k for v in ks.values() for k in v]  # the spec's aggregate compute: attention 36.1 %, MLP 46.9 %
    assert round(evals.count(256) / len(evals), 3) == 0.361 and round(sum(evals) / (256 * len(evals)), 3) == 0.469
    assert all(k == 0 for i in range(48, 37, -1) if i not in DDIM50_N3 + [45] for k in ks[i])
    ks2, _ = Driver(ToCa(3, 0.07, "ToCa-ddim50", decision="per-step")).run(50)
    kinds = {i: (min(v) == 256, max(v) == 256) for i, v in ks2.items()}
    assert all(a == b for a, b in kinds.values())  # no mixed steps
    assert kinds[45] == (True, True) and kinds[32] == (True, True)


@pytest.mark.parametrize("schedule,expect", [
    ("constant", lambda i, l: 0.07), ("linear", lambda i, l: 0.07 * (1 + 0.9 - 2 * 0.9 * i / 50)),
    ("exp", lambda i, l: 0.07 * 0.9 ** (i / 50)), ("layerwise", lambda i, l: 0.07 * (1 + 0.9 - 2 * 0.9 * l / 27)),
    ("linear-layerwise", lambda i, l: 0.07 * (1.8 - 1.6 * l / 27) * (1.4 - 0.8 * i / 50) * 2.5),
])
def test_other_schedules(schedule, expect):
    ks, _ = Driver(ToCa(3, 0.07, schedule), grid=8, seed=3).run(50)
    for i, layer in [(47, 0), (47, 27), (13, 9), (1, 20)]:
        assert ks[i][layer] == int(np.float32(min(expect(i, layer), 1.0)) * np.float32(64)), (i, layer)


# ------------------------------------------------------------------------ equivalences and rows
def test_fresh_ratio_zero_is_fora_bitwise():
    model = tiny_dit(depth=3, hidden=32, heads=2, input_size=8, patch=2)
    noise, labels = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([3, 4])
    torch.manual_seed(5)
    a = sample(model, noise, labels, 12, "ddpm", 1.5, ToCa(4, 0.0, "ToCa-ddpm250"))
    torch.manual_seed(5)
    b = sample(model, noise, labels, 12, "ddpm", 1.5, FORA(4))
    assert torch.equal(a, b)


def test_kv_norm_keeps_fused_attention():
    """Full steps of the kv-norm score run SDPA: a one-step run equals the uncached one bit for bit."""
    model = tiny_dit(depth=2, hidden=32, heads=2, input_size=8, patch=2)
    noise, labels = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1])
    a = sample(model, noise, labels, 1, "ddim", 1.5, ToCa(2, 0.3, score="kv-norm"))
    b = sample(model, noise, labels, 1, "ddim", 1.5, NoCache())
    assert torch.equal(a, b)
    assert not ToCa(score="kv-norm").needs_attention_map and ToCa().needs_attention_map


@pytest.mark.parametrize("score", S.SCORES)
def test_every_score_samples_and_reruns_identically(score):
    model = tiny_dit(depth=2, hidden=32, heads=2, input_size=8, patch=2)
    noise, labels = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1])
    policy = ToCa(3, 0.2, "ToCa-ddpm250", score=score)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(sample(model, noise, labels, 8, "ddim", 1.5, policy, return_stats=True))
    assert torch.equal(runs[0][0], runs[1][0])
    assert 0 < runs[0][1].share_computed("mlp") < 1
    assert torch.isfinite(runs[0][0]).all()


def test_rows_choose_their_own_tokens_and_counters_are_per_row():
    d = Driver(ToCa(3, 0.3, "constant", staleness_weight=0.25, bonus=0.0), depth=1, grid=4)
    h = d.h
    h.reset(RunInfo(10, 2, True))
    ctx = StepContext(9, 10)
    h.decide(ctx, 0, "attn")
    amap = torch.full((2, 16, 16), 1 / 16)
    amap[0, :, 3] += 1.0  # row 0 (cond): token 3 receives most attention
    amap[1, :, 12] += 1.0  # row 1 (uncond): token 12
    h.observe(ctx, 0, "attn", attn_map=amap)
    assert h.decide(ctx, 0, "mlp", x=torch.zeros(2, 16, 4)).kind == "compute"
    ctx = StepContext(7, 10)  # the interval became round(3 / 0.68) = 4: steps 7 and 6 are partial
    assert h.decide(ctx, 0, "attn").kind == "reuse"
    idx = h.decide(ctx, 0, "mlp", x=torch.zeros(2, 16, 4)).index
    assert idx.shape == (2, int(np.float32(0.3) * np.float32(16)))
    assert idx[0, 0] == 3 and idx[1, 0] == 12
    counter = h.call_state(0).counters[0]
    for r in range(2):
        assert (counter[r, idx[r]] == 0).all() and counter[r].sum() == 16 - idx.shape[1]
    expect = S.attention_received(amap) + 0.25 * (counter.float() / 3)
    assert h.decide(StepContext(6, 10), 0, "attn").kind == "reuse"
    idx2 = h.decide(StepContext(6, 10), 0, "mlp", x=torch.zeros(2, 16, 4)).index
    assert torch.equal(idx2, expect.argsort(dim=-1, descending=True)[:, :idx.shape[1]])


# ------------------------------------------------------------------------ scores on hand-made inputs
def test_attention_and_compress_scores():
    amap = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.2, 0.6]]])  # (1, 3, 3)
    cols = torch.tensor([0.7, 1.7, 0.6])
    assert torch.allclose(S.attention_received(amap), cols / cols.norm())
    assert torch.allclose(S.attention_over_max(amap), cols / 1.7)


def test_value_norm_norm_similarity_scores():
    v = torch.tensor([[[1.0, 0.0, 2.0], [0.5, 0.5, 0.5]]])  # (1, H=2, T=3) value norms
    s = torch.tensor([0.5, 1.5, -0.5])  # sum over heads of 1 - ||v||
    assert torch.allclose(S.value_norm_score(v), (s / s.norm())[None])
    x = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])  # norms 5, 1
    assert torch.allclose(S.norm_score(x), torch.tensor([[5.0, 1.0]]) / math.sqrt(26))
    cached = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # cos 1 and 0 -> distance 0, 1
    assert torch.allclose(S.similarity_score(x, cached), torch.tensor([[0.0, 1.0]]))


def test_random_straight_staleness_and_bonus():
    torch.manual_seed(0)
    r = S.random_score(4, 6, True, "cpu")
    assert torch.equal(r[:2], r[2:]) and not torch.equal(r[0], r[1]) and ((0 <= r) & (r < 1)).all()
    torch.manual_seed(0)
    first = torch.rand(2, 6)
    torch.manual_seed(0)
    assert torch.equal(S.random_score(4, 6, True, "cpu")[:2], first)
    assert S.random_score(3, 6, False, "cpu").shape == (3, 6)
    counter = torch.tensor([[0, 2, 4]], dtype=torch.int32)
    assert torch.allclose(S.with_staleness(torch.zeros(1, 3), counter, 0.25, 4), torch.tensor([[0, 0.125, 0.25]]))
    score = torch.arange(16, dtype=torch.float32)[None] / 16  # 4x4 grid, row-major
    out = S.spatial_bonus(score, (4, 4), 0.6, 2)
    winners = [5, 7, 13, 15]  # bottom-right token of each 2x2 cell
    expect = score.clone()
    expect[0, winners] += score[0, winners] * 0.6
    assert torch.allclose(out, expect)


# ------------------------------------------------------------------------ configuration
@pytest.mark.parametrize("kwargs", [
    dict(fresh_ratio=-0.1), dict(fresh_ratio=1.5), dict(fresh_ratio=float("nan")), dict(schedule="ToCa"),
    dict(score="entropy"), dict(interval=0), dict(interval=2.0), dict(decision="sometimes"),
    dict(staleness_weight=-1.0), dict(bonus_grid=0),
])
def test_bad_settings_raise(kwargs):
    with pytest.raises(ConfigError):
        ToCa(**kwargs)


def test_bonus_grid_must_divide_token_grid_and_dict_roundtrip():
    model = tiny_dit(depth=1, hidden=32, heads=2, input_size=4, patch=2)  # 2x2 token grid
    with pytest.raises(ConfigError):
        stepcache.apply(model, ToCa(bonus_grid=4))
    cfg = ToCa(4, 0.07, "ToCa-ddpm250", score="kv-norm")
    assert stepcache.PolicyConfig.from_dict(cfg.to_dict()) == cfg


def test_toca_with_forecast_composition(one_thread):
    """forecast=True: partial steps extrapolate the attention and the MLP tokens not recomputed from the last
    two full steps (the same tokens recomputed as without); other variants refuse it."""
    from stepcache import NoCache, sample
    from helpers import tiny_dit

    model = tiny_dit()
    noise, labels = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2])
    run = dict(num_steps=10, sampler="ddim", cfg_scale=1.5)
    base = sample(model, noise, labels, policy=NoCache(), **run)
    plain, ps = sample(model, noise, labels, policy=ToCa(interval=3, fresh_ratio=0.2), return_stats=True, **run)
    fore, fs = sample(model, noise, labels, policy=ToCa(interval=3, fresh_ratio=0.2, forecast=True),
                      return_stats=True, **run)
    assert not torch.equal(plain, fore) and fs.macs_policy > 0 and ps.macs_policy == 0
    assert (fore - base).abs().max() < (plain - base).abs().max()  # closer to the uncached run
    assert fs.layer_tokens("mlp") == ps.layer_tokens("mlp")  # the same tokens recomputed
    with pytest.raises(ConfigError):
        ToCa(forecast=True).resolved("pixart")
