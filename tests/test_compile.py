"""torch.compile under a cache: both orders of apply and compile, regional compilation, no recompiles.

Dynamo runs with a counting backend that executes the captured graphs as they are (the ``eager``
backend plus a graph count), so outputs are compared bit for bit with the eager cached run and every
graph dynamo builds is counted: after the first sampling run none may be added.
"""

import os

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import stepcache
from stepcache import FORA, ToCa
from stepcache.errors import ConfigError, UnsupportedModelError
from helpers import tiny_dit, tiny_uvit

pytestmark = pytest.mark.usefixtures("one_thread")

POLICIES = {"fora": lambda: FORA(3), "toca": lambda: ToCa(3, 0.3, "ToCa-ddim50")}
STEPS = 8


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # compiled code is cached per code object: start every test from none
    yield
    torch._dynamo.reset()


def _inputs():
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return noise, torch.tensor([1, 2])


def _sample(model, steps=STEPS, policy=None):
    noise, labels = _inputs()
    torch.manual_seed(1)
    return stepcache.sample(model, noise, labels, steps, "ddim", 1.5, policy)


def _eager(policy_name, steps=STEPS):
    return _sample(tiny_dit(), steps, POLICIES[policy_name]())


def _runs_without_recompiling(model, counter, want, steps=STEPS):
    """Three sampling runs equal the eager cached one; graphs are built in the first only."""
    assert torch.equal(_sample(model, steps), want)
    built = counter.frame_count
    assert built > 0  # something was compiled
    for _ in range(2):
        assert torch.equal(_sample(model, steps), want)
    assert counter.frame_count == built, "a later run of the same shapes recompiled"
    return built


@pytest.mark.parametrize("name", list(POLICIES))
def test_apply_then_compile(name):
    want = _eager(name)
    model, counter = tiny_dit(), CompileCounter()
    handle = stepcache.apply(model, POLICIES[name]())
    compiled = torch.compile(model, backend=counter)
    _runs_without_recompiling(compiled, counter, want)
    assert handle.stats().nfe == STEPS and handle.stats().ideal_speedup > 1.2
    handle.remove()
    assert "forward" not in model.__dict__ and all("forward" not in b.__dict__ for b in model.blocks)


@pytest.mark.parametrize("name", list(POLICIES))
def test_compile_then_apply_keeps_the_handle_findable_from_the_wrapper(name):
    want = _eager(name)
    model, counter = tiny_dit(), CompileCounter()
    plain = _sample(model)
    compiled = torch.compile(model, backend=counter)
    handle = stepcache.apply(compiled, POLICIES[name]())
    assert handle.model is model and stepcache.get_handle(compiled) is handle
    _runs_without_recompiling(compiled, counter, want)
    assert "model calls" in stepcache.summary(compiled)
    assert stepcache.remove(compiled) and stepcache.get_handle(compiled) is None
    assert "forward" not in model.__dict__ and all("forward" not in b.__dict__ for b in model.blocks)
    assert torch.equal(_sample(compiled), plain)  # remove() restored the plain model under the wrapper


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("order", ["compile_blocks then apply", "apply then compile_blocks"])
def test_regional_compilation_one_graph_per_region(name, order):
    want = _eager(name)
    model, counter = tiny_dit(), CompileCounter()
    if order.startswith("compile"):
        stepcache.compile_blocks(model, backend=counter)
        handle = stepcache.apply(model, POLICIES[name]())
    else:
        handle = stepcache.apply(model, POLICIES[name]())
        stepcache.compile_blocks(model, backend=counter)
    built = _runs_without_recompiling(model, counter, want)
    # shared by the 4 blocks: modulation, attention (ToCa's full steps: the attention with its map), MLP; ToCa's
    # partial MLP on a token subset runs eager, so no graph dynamic in the token count is built
    assert built == 3
    handle.remove()
    assert stepcache.uncompile_blocks(model) and not stepcache.uncompile_blocks(model)
    assert all(not {"forward", "attn_branch", "mlp_branch", "modulation"} & set(b.__dict__) for b in model.blocks)


def test_whole_and_regional_together_and_another_step_count():
    """The issue's habit (compile everything) plus regional compilation; a run with another step count adds no
    graph either (nothing compiled depends on the step count: the clock lives outside the graphs)."""
    model, counter = tiny_dit(), CompileCounter()
    stepcache.compile_blocks(model, backend=counter)
    compiled = torch.compile(model, backend=counter)
    with stepcache.apply(compiled, FORA(3)):
        _runs_without_recompiling(compiled, counter, _eager("fora"))
        built = counter.frame_count
        assert torch.equal(_sample(compiled, STEPS + 3), _eager("fora", STEPS + 3))
        assert counter.frame_count == built


def test_compile_blocks_refuses_twice_and_unknown_models():
    model = tiny_dit()
    stepcache.compile_blocks(model, backend="eager")
    with pytest.raises(ConfigError, match="already compiled"):
        stepcache.compile_blocks(model, backend="eager")
    with pytest.raises(UnsupportedModelError, match="compile_blocks"):
        stepcache.compile_blocks(tiny_uvit(), backend="eager")


def test_compile_blocks_under_a_handle_keeps_it_working():
    """Regional compilation after apply re-hooks the model: the same handle, its statistics, remove()."""
    model = tiny_dit()
    plain = _sample(model)
    handle = stepcache.apply(model, FORA(2))
    stepcache.compile_blocks(model, backend="eager")
    assert stepcache.get_handle(model) is handle
    assert torch.equal(_sample(model), _eager_with(FORA(2)))
    assert handle.stats().nfe == STEPS and handle.stats().ideal_speedup > 1.5
    handle.remove()
    assert all("forward" not in b.__dict__ for b in model.blocks)
    assert torch.equal(_sample(model), plain)


def _eager_with(policy):
    return _sample(tiny_dit(), STEPS, policy)


@pytest.mark.skipif(not os.environ.get("STEPCACHE_INDUCTOR_TESTS"),
                    reason="inductor compiles C++ kernels (tens of seconds on a loaded CPU); set "
                           "STEPCACHE_INDUCTOR_TESTS=1 (benchmarks/bench_compile.py runs it too)")
def test_inductor_regional_matches_eager_to_float_tolerance():
    want = _eager("fora")
    model = tiny_dit()
    stepcache.compile_blocks(model)
    with stepcache.apply(model, FORA(3)):
        for _ in range(2):
            torch.testing.assert_close(_sample(model), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ diffusers pipelines
def _pipeline(name):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from test_diffusers import FAMILIES

    build, run = FAMILIES[name]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    return pipe, run


def _compile_repeated_blocks(transformer, backend):
    """diffusers' regional compilation: ``compile_repeated_blocks`` where the class declares its blocks (FLUX),
    else what it does, by hand (each transformer block's ``compile()``)."""
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(backend=backend)
    else:
        for block in transformer.transformer_blocks:
            block.compile(backend=backend)


@pytest.mark.parametrize("name, regions", [("dit", "both"), ("flux", "diffusers blocks"),
                                           ("flux", "stepcache.compile_blocks")])
def test_diffusers_regional_compilation_then_apply_then_pipe(name, regions):
    pipe, run = _pipeline(name)
    with stepcache.apply(pipe.transformer, FORA(2)):
        want = run(pipe, steps=4)
    counter = CompileCounter()
    if regions != "stepcache.compile_blocks":
        _compile_repeated_blocks(pipe.transformer, counter)
    with stepcache.apply(pipe.transformer, FORA(2)) as handle:
        if regions != "diffusers blocks":
            stepcache.compile_blocks(pipe, backend=counter)  # after apply: the hooks are put back on top
        assert torch.equal(run(pipe, steps=4), want)
        built = counter.frame_count
        assert built > 0
        for _ in range(2):
            assert torch.equal(run(pipe, steps=4), want)
        assert counter.frame_count == built and handle.stats().nfe == 4
        run(pipe, steps=5)  # another step count: nothing compiled depends on it
        assert counter.frame_count == built
    assert stepcache.uncompile_blocks(pipe) == (regions != "diffusers blocks")
    assert all("forward" not in m.__dict__ for m in pipe.transformer.modules())


def test_diffusers_compiled_transformer_in_the_pipeline():
    """``pipe.transformer = torch.compile(pipe.transformer)`` then ``apply(pipe, ...)``: the hooks go on the module
    inside the wrapper and the pipeline's clock drives them."""
    pipe, run = _pipeline("dit")
    with stepcache.apply(pipe, FORA(2)):
        want = run(pipe, steps=4)
    counter = CompileCounter()
    pipe.transformer = torch.compile(pipe.transformer, backend=counter)
    with stepcache.apply(pipe, FORA(2)) as handle:
        assert stepcache.get_handle(pipe) is handle and stepcache.get_handle(pipe.transformer) is handle
        assert torch.equal(run(pipe, steps=4), want)
        built = counter.frame_count
        assert built > 0 and torch.equal(run(pipe, steps=4), want) and counter.frame_count == built


def test_uvit_whole_model_compile_under_a_cache():
    """Every adapter's hooks run outside the graph: U-ViT (no regional recipe) compiles whole, in either order."""
    model, counter = tiny_uvit(), CompileCounter()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([3])

    def run(m):
        torch.manual_seed(1)
        return stepcache.sample(m, z, y, num_steps=5, sampler="dpm-solver++2s", cfg_scale=1.4)

    with stepcache.apply(model, FORA(2)):
        want = run(model)
    compiled = torch.compile(model, backend=counter)
    with stepcache.apply(compiled, FORA(2)):
        assert torch.equal(run(compiled), want)
        built = counter.frame_count
        assert built > 0 and torch.equal(run(compiled), want) and counter.frame_count == built
