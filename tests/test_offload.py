"""Issue 12, the diffusers habits: ``pipe.enable_model_cpu_offload()`` beside ``stepcache.apply(pipe.transformer,
FORA(3))`` gives the images of the cached run without offload, on every family.

Model CPU offload is accelerate's ``CpuOffload`` hook on each component (weights moved to the execution device
at the component's first forward, back to the CPU when the next component runs). On CPU-only torch the execution
device is the CPU itself: ``enable_model_cpu_offload(device="cpu")`` installs the very same hooks (the default
device needs an accelerator), so what is tested here is that the cache's patches and accelerate's hooks compose.

Known defect (adapters, see ``test_..._second_call``): at the end of every call the pipeline runs
``maybe_free_model_hooks()``, which removes accelerate's hooks (restoring ``forward`` to the one accelerate
saved, i.e. dropping stepcache's transformer-level patch installed after it) and adds them again; the second
call then runs the blocks' cache sites without a step context.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

import stepcache  # noqa: E402
from stepcache import FORA  # noqa: E402
from test_diffusers import FAMILIES  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _offload_hook(module):
    hook = getattr(module, "_hf_hook", None)
    return type(hook).__name__ if hook is not None else None


def _pipes(name):
    """(fresh pipeline builder, runner, uncached images, images cached with FORA(3) without offload)."""
    build, run = FAMILIES[name]

    def fresh():
        pipe = build()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipe = fresh()
    base = run(pipe)
    with stepcache.apply(pipe.transformer, FORA(3)):
        want = run(pipe)
    assert not torch.equal(want, base)                             # the cache does change the images
    return fresh, run, base, want


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_model_cpu_offload_then_apply_gives_the_cached_images(name):
    fresh, run, base, want = _pipes(name)
    pipe = fresh()
    pipe.enable_model_cpu_offload(device="cpu")
    assert _offload_hook(pipe.transformer) == "CpuOffload"
    with stepcache.apply(pipe.transformer, FORA(3)) as handle:
        assert torch.equal(run(pipe), want)
        assert handle.stats().macs_executed < handle.stats().macs_uncached
        assert _offload_hook(pipe.transformer) == "CpuOffload"    # accelerate's hook still wraps the transformer


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_apply_then_model_cpu_offload_gives_the_cached_images_on_every_call(name):
    fresh, run, base, want = _pipes(name)
    pipe = fresh()
    with stepcache.apply(pipe.transformer, FORA(3)) as handle:
        pipe.enable_model_cpu_offload(device="cpu")
        assert torch.equal(run(pipe), want)
        assert torch.equal(run(pipe), want)                        # offload's hooks are re-made after each call
        assert handle.stats().nfe == 3
    assert _offload_hook(pipe.transformer) == "CpuOffload"



@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_model_cpu_offload_then_apply_survives_the_hooks_remade_after_each_call(name):
    """diffusers removes and re-adds accelerate's hooks after every call; the cache stays installed."""
    fresh, run, base, want = _pipes(name)
    pipe = fresh()
    pipe.enable_model_cpu_offload(device="cpu")
    with stepcache.apply(pipe.transformer, FORA(3)) as handle:
        for _ in range(3):
            assert torch.equal(run(pipe), want)
            assert handle.stats().macs_executed < handle.stats().macs_uncached
    assert _offload_hook(pipe.transformer) == "CpuOffload"       # remove() left accelerate's hook in place
    assert "forward" not in pipe.transformer.__dict__ or pipe.transformer.forward.func.__name__ == "new_forward"
    assert torch.equal(run(pipe), base)                           # and the model runs uncached again
