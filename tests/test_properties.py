"""Property tests (hypothesis) on tiny DiTs: random step counts, batch sizes, CFG layouts, samplers, policies and
their parameters (issue 13, "What must be shown").

- The refresh-every-step setting of every policy (FORA(1), ToCa(interval=1), an L2C router that recomputes
  everything) equals the uncached run bit for bit.
- ``remove()`` restores the model exactly: outputs bit for bit and the instance attributes.
- Nothing leaks from one run into the next: a run after any other run on the same handle equals a fresh one.
- A refused ``apply`` changes nothing (native DiT, and a diffusers transformer with feed-forward chunking).
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import stepcache  # noqa: E402
from stepcache import FORA, L2C, NoCache, ToCa, sample  # noqa: E402
from stepcache.errors import StepcacheError  # noqa: E402
from helpers import tiny_dit  # noqa: E402

DEPTH = 2
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MODEL = tiny_dit(depth=DEPTH, hidden=32, heads=2, input_size=8, patch=2)

runs = st.fixed_dictionaries({
    "steps": st.integers(1, 7),
    "batch": st.integers(1, 3),
    "sampler": st.sampled_from(["ddpm", "ddim"]),
    "cfg": st.sampled_from([1.0, 1.5, 4.0]),
    "channels": st.sampled_from([None, "all", 1]),
    "seed": st.integers(0, 2**16),
})


@st.composite
def active_policies(draw, steps: int):
    """Any policy with any settings that fit a run of ``steps`` steps."""
    kind = draw(st.sampled_from(["none", "fora", "toca", "l2c"]))
    if kind == "none":
        return NoCache()
    if kind == "fora":
        return FORA(draw(st.integers(1, 5)))
    if kind == "toca":
        return ToCa(interval=draw(st.integers(1, 5)), fresh_ratio=draw(st.sampled_from([0.0, 0.1, 0.3, 0.7])),
                    schedule=draw(st.sampled_from(["ToCa-ddim50", "ToCa-ddpm250"])),
                    score=draw(st.sampled_from(["attention", "kv-norm"])), decision=draw(st.sampled_from(
                        ["reference", "per-step"])))
    logits = draw(st.lists(st.lists(st.floats(-5, 5), min_size=2 * DEPTH, max_size=2 * DEPTH), min_size=steps,
                           max_size=steps))
    return L2C(logits, threshold=draw(st.sampled_from([0.1, 0.5, 0.9])))


def refresh_every_step(kind: str, steps: int, draw):
    """The no-op setting of each policy: everything recomputed at every step."""
    if kind == "fora":
        return FORA(1)
    if kind == "toca":
        return ToCa(interval=1, fresh_ratio=draw(st.sampled_from([0.0, 0.1, 0.5])),
                    score=draw(st.sampled_from(["attention", "kv-norm"])))
    return L2C([[5.0] * (2 * DEPTH)] * steps, threshold=draw(st.sampled_from([0.0, 0.1, 0.5])))


def _inputs(run):
    g = torch.Generator().manual_seed(run["seed"])
    noise = torch.randn(run["batch"], 4, 8, 8, generator=g)                       # (n, C, H, W)
    labels = torch.randint(0, 10, (run["batch"],), generator=g)                  # (n,)
    return noise, labels


def _sample(model, run, policy=None):
    noise, labels = _inputs(run)
    torch.manual_seed(run["seed"])                                                # per-step noise
    return sample(model, noise, labels, run["steps"], run["sampler"], run["cfg"], policy,
                  guide_channels=run["channels"])


@SETTINGS
@given(run=runs, kind=st.sampled_from(["fora", "toca", "l2c"]), data=st.data())
def test_refresh_every_step_equals_uncached_bit_for_bit(run, kind, data):
    policy = refresh_every_step(kind, run["steps"], data.draw)
    assert torch.equal(_sample(MODEL, run, policy), _sample(MODEL, run))


@SETTINGS
@given(run=runs, data=st.data())
def test_remove_restores_outputs_and_attributes_exactly(run, data):
    model = tiny_dit(depth=DEPTH, hidden=32, heads=2, input_size=8, patch=2)
    noise, labels = _inputs(run)
    t = torch.randint(0, 1000, (run["batch"],), generator=torch.Generator().manual_seed(run["seed"]))
    with torch.no_grad():
        before = model(noise, t, labels)
    attrs = {name: dict(m.__dict__) for name, m in model.named_modules()}
    handle = stepcache.apply(model, data.draw(active_policies(run["steps"])))
    _sample(model, run)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(noise, t, labels), before)
    after = {name: dict(m.__dict__) for name, m in model.named_modules()}
    assert after.keys() == attrs.keys()
    for name in attrs:
        assert after[name].keys() == attrs[name].keys(), name


@SETTINGS
@given(first=runs, second=runs, data=st.data())
def test_no_state_leaks_from_one_run_into_the_next(first, second, data):
    """The second run on a handle that already ran the first equals the second run on a fresh handle, for any
    policy: state is per run (DESIGN.md: reset() at the start of every sampling run)."""
    policy = data.draw(active_policies(first["steps"]))
    if isinstance(policy, L2C):                                   # a router is made for one step count
        second = {**second, "steps": first["steps"]}
    fresh = _sample(MODEL, second, policy)
    with stepcache.apply(MODEL, policy):
        _sample(MODEL, first)
        again = _sample(MODEL, second)
    assert torch.equal(again, fresh)


@SETTINGS
@given(run=runs, depth=st.sampled_from([1, 3, 4]))
def test_a_refused_apply_on_a_native_dit_changes_nothing(run, depth):
    """A router for another depth is refused; the model is left exactly as it was."""
    noise, labels = _inputs(run)
    attrs = {name: dict(m.__dict__).keys() for name, m in MODEL.named_modules()}
    base = _sample(MODEL, run)
    with pytest.raises(StepcacheError):
        stepcache.apply(MODEL, L2C([[0.0] * (2 * depth)] * run["steps"]))
    assert {name: dict(m.__dict__).keys() for name, m in MODEL.named_modules()} == attrs
    assert torch.equal(_sample(MODEL, run), base)


def test_a_refused_apply_on_a_chunked_diffusers_transformer_changes_nothing():
    """Issue 13 item 3 (fixed in the engine): the refusal used to leave the root and block 0 patched."""
    diffusers = pytest.importorskip("diffusers")
    from helpers import randomize

    torch.manual_seed(0)
    tr = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                         num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    tr = randomize(tr).eval()
    for block in tr.transformer_blocks:
        block.set_chunk_feed_forward(1, dim=1)
    before = {name: dict(m.__dict__).keys() for name, m in tr.named_modules()}
    with pytest.raises(StepcacheError):
        stepcache.apply(tr, FORA(2))
    assert {name: dict(m.__dict__).keys() for name, m in tr.named_modules()} == before
