"""The clock for diffusers pipelines, without editing the pipeline.

``stepcache.apply(pipe, policy)`` calls :func:`attach_pipeline`: the pipeline instance gets a
subclass of its own class (same name and module) whose ``__call__`` wraps the original, so
``pipe(...)`` runs inside :meth:`PipelineClock.pipeline_call`; ``remove()`` puts the original
class back. Per pipeline call:

1. State resets: the previous run's caches are dropped; the scheduler instance the pipeline holds
   now gets an instance-level ``step`` wrapper that counts finished steps (restored at the end).
2. At the first transformer call the run begins, after ``scheduler.set_timesteps``: the run has
   ``S = len(scheduler.timesteps) - scheduler.begin_index`` steps (``begin_index`` is set by
   img2img pipelines, else 0) and the batch of that call.
3. Step rule: after ``n`` finished ``scheduler.step`` calls the transformer is at step
   ``i = S - 1 - n`` (counting DOWN). The timestep the pipeline passes (times the adapter's
   ``timestep_scale``: FLUX passes ``t / 1000``) must equal ``scheduler.timesteps[begin + n]``;
   otherwise a :class:`ClockError` is raised rather than guessing.
4. Several transformer calls within one step (FLUX true CFG: cond then uncond) get ``call = 0, 1,
   ...`` and separate caches (the runtime keeps one state per call index).

CFG layout: batched pipelines mark the run ``cfg`` when the rows are twice the conditional batch;
DiT puts cond first, PixArt/SD3 put uncond first (``RunInfo.uncond_first``).

A bare transformer (no pipeline) has no clock: drive it with ``handle.begin_run`` /
``handle.set_step``, or it raises :class:`ClockError` on the first call.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import torch

from stepcache.errors import ClockError, ConfigError
from stepcache.core.context import StepContext
from stepcache.core.hooks import AttrPatch

_CLASS_CACHE: dict[type, type] = {}
_ATTR = "_stepcache_clock"


def _tolerance(timestep, expected: float) -> float:
    """How far the timestep a pipeline passes may be from the scheduler's: pipelines cast it to the model
    dtype (FLUX in bfloat16 passes t / 1000 rounded to 8 bits of mantissa), so allow two units in the last
    place of that dtype, and never less than 1e-3 relative."""
    dtype = timestep.dtype if isinstance(timestep, torch.Tensor) and timestep.is_floating_point() else torch.float32
    return max(1e-3, 2 * torch.finfo(dtype).eps) * max(1.0, abs(expected))


def _timestep_value(timestep) -> float:
    """First entry of the timestep a pipeline passes (tensor of shape (), (1,) or (B,), or a number)."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])
    return float(timestep)


class PipelineClock:
    """Publishes (i, S, t, call) for one pipeline's transformer; one instance per applied handle."""

    def __init__(self, pipe, handle):
        self.pipe, self.handle = pipe, handle
        self.active = self.started = False

    @property
    def starting(self) -> bool:
        """True inside a pipeline call before its first transformer call (the run is not begun yet)."""
        return self.active and not self.started

    # ------------------------------------------------------------------ per pipeline call
    @contextlib.contextmanager
    def pipeline_call(self, cfg: bool):
        if self.active:
            raise ClockError("This pipeline is already running; stepcache does not support re-entrant calls.")
        scheduler = self.pipe.scheduler
        self.active, self.started, self.cfg = True, False, cfg
        self.steps_done, self.calls_in_step = 0, 0
        self.handle.end_run()
        original_step = scheduler.step

        @functools.wraps(original_step)
        def step(*args, **kwargs):
            out = original_step(*args, **kwargs)
            self.steps_done += 1
            self.calls_in_step = 0
            self._maybe_finish_late()
            return out

        patch = AttrPatch(scheduler, "step", step)
        try:
            yield
        finally:
            patch.restore()
            self.handle.end_run()
            self.active = False

    def adopt_running_call(self, cfg: bool) -> None:
        """Start the clock inside a pipeline call that is already running (stepcache was applied to the bare
        transformer and its pipeline found at the first transformer call): the state ends when the
        scheduler has taken all its steps."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.pipeline_call(cfg))
        self._late = stack

    def _maybe_finish_late(self) -> None:
        late = getattr(self, "_late", None)
        if late is not None and self.started and self.steps_done >= self.handle.run.num_steps:
            self._late = None
            late.close()

    # ------------------------------------------------------------------ per transformer call
    def on_model_call(self, rows: int, timestep, adapter) -> None:
        if not self.active:
            raise ClockError("The transformer of a pipeline with stepcache applied was called outside the "
                             "pipeline; call the pipeline, or drive handle.begin_run()/set_step() yourself.")
        scheduler = self.pipe.scheduler
        begin = int(getattr(scheduler, "begin_index", None) or 0)
        timesteps = scheduler.timesteps
        if timesteps is None:
            raise ClockError("The scheduler has no timesteps: the pipeline called the transformer "
                             "before set_timesteps.")
        if not self.started:
            self._begin(len(timesteps) - begin, rows, adapter)
        S = self.handle.run.num_steps
        n = self.steps_done
        if n >= S:
            raise ClockError(f"The pipeline called the transformer after all {S} scheduler steps were taken.")
        t = _timestep_value(timestep) * adapter.timestep_scale
        expected = float(timesteps[begin + n])
        if abs(t - expected) > _tolerance(timestep, expected):
            raise ClockError(f"The transformer got timestep {t:g} but the scheduler is at {expected:g} (step {n}); "
                             "stepcache cannot tell which step this pipeline is on.")
        call = self.calls_in_step
        self.calls_in_step += 1  # each call of a step keeps its own state in the runtime (core.state)
        self.handle.set_step(StepContext(i=S - 1 - n, num_steps=S, t=expected, call=call))

    def _begin(self, num_steps: int, rows: int, adapter) -> None:
        batched = self.cfg and adapter.cfg_layout != "separate_calls"
        if batched and rows % 2:
            raise ClockError(f"A CFG batch must have an even number of rows, got {rows}.")
        uncond_first = batched and adapter.cfg_layout == "uncond_first"
        self.handle.begin_run(num_steps, rows, cfg=batched, uncond_first=uncond_first)
        self.started = True


def _guidance_on(pipe_cls: type, args, kwargs) -> bool:
    """Whether this pipeline call uses classifier-free guidance (from its own arguments and defaults)."""
    try:
        bound = inspect.signature(pipe_cls.__call__).bind(None, *args, **kwargs)
    except TypeError:
        return False
    bound.apply_defaults()
    scale = bound.arguments.get("true_cfg_scale", bound.arguments.get("guidance_scale"))
    if "true_cfg_scale" in bound.arguments:  # FLUX: true CFG needs a negative prompt
        neg = bound.arguments.get("negative_prompt") or bound.arguments.get("negative_prompt_embeds") is not None
        return bool(scale is not None and scale > 1 and neg)
    return bool(scale is not None and scale > 1)


def _clocked_class(cls: type) -> type:
    """A subclass of ``cls`` (same name) whose ``__call__`` runs under the instance's clock."""
    if cls not in _CLASS_CACHE:
        base_call = cls.__call__

        @functools.wraps(base_call)
        def __call__(self, *args, **kwargs):
            clock = self.__dict__[_ATTR]
            with clock.pipeline_call(_guidance_on(cls, args, kwargs)):
                return base_call(self, *args, **kwargs)

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__, "_stepcache_base": cls})
        _CLASS_CACHE[cls] = sub
    return _CLASS_CACHE[cls]


class PipelinePatch:
    """Installed by :func:`attach_pipeline`; ``restore()`` gives the pipeline its own class back."""

    def __init__(self, pipe, handle):
        if not hasattr(pipe, "scheduler"):
            raise ConfigError(f"{type(pipe).__name__} has no scheduler; apply stepcache to its transformer instead.")
        if _ATTR in pipe.__dict__:
            raise ConfigError("This pipeline already has a stepcache clock; remove the other handle first.")
        self.pipe, self.original_class = pipe, type(pipe)
        self.clock = PipelineClock(pipe, handle)
        handle.clock = self.clock
        pipe.__dict__[_ATTR] = self.clock
        pipe.__class__ = _clocked_class(self.original_class)

    def restore(self) -> None:
        self.pipe.__class__ = self.original_class
        self.pipe.__dict__.pop(_ATTR, None)
        self.clock.handle.clock = None


def _is_pipeline_of(obj, transformer) -> bool:
    return (getattr(obj, "__dict__", {}).get("transformer") is transformer and hasattr(obj, "scheduler")
            and any(c.__name__ == "DiffusionPipeline" for c in type(obj).__mro__))


def find_pipeline(transformer):
    """The one diffusers pipeline holding ``transformer`` (``pipe.transformer``), or None (none, or several)."""
    import gc

    owners = []
    for ref in gc.get_referrers(transformer):
        if isinstance(ref, dict):
            owners += [o for o in gc.get_referrers(ref) if _is_pipeline_of(o, transformer)]
    unique = {id(o): o for o in owners}
    return next(iter(unique.values())) if len(unique) == 1 else None


def pipeline_in_stack(transformer, depth: int = 12):
    """(pipeline, its __call__ locals) if a pipeline's ``__call__`` up the stack is calling ``transformer``."""
    import sys

    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None, None
        owner = frame.f_locals.get("self")
        if owner is not None and _is_pipeline_of(owner, transformer):
            return owner, dict(frame.f_locals)
        frame = frame.f_back
    return None, None


def adopt_from_stack(transformer, handle) -> bool:
    """Attach the clock of the pipeline now calling ``transformer`` (stepcache applied to the bare
    transformer); True if one was found and the clock runs for this call."""
    pipe, local = pipeline_in_stack(transformer)
    if pipe is None:
        return False
    handle._patches.append(attach_pipeline(pipe, handle))
    base = type(pipe).__dict__.get("_stepcache_base", type(pipe))
    names = set(inspect.signature(base.__call__).parameters) - {"self"}
    handle.clock.adopt_running_call(_guidance_on(base, (), {k: v for k, v in local.items() if k in names}))
    return True


def attach_pipeline(pipe, handle) -> PipelinePatch:
    """Drive ``handle`` from ``pipe``'s own loop; ``restore()`` of the returned patch undoes it."""
    return PipelinePatch(pipe, handle)
