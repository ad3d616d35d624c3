"""Training L2C routers for DPM-Solver++(2S) runs (U-ViT's objective; Ma et al., arXiv 2406.01733, Eq. 8-9).

The model is frozen and run without guidance. One iteration, for one solver step j drawn uniformly
from 0 .. N-2 and shared by the local batch (label dropout 0.1 shared by all calls)::

    x_j     = alpha(t_j) x0 + sigma(t_j) noise                # no grad
    x_{j+1} = DPM-Solver++(2S) step j -> j+1 from x_j          # no grad; both evaluations fill the cache,
                                                               # so the midpoint's branch outputs remain
    teacher = model(x_{j+1}, t_{j+1})                          # full
    student = model(x_{j+1}, t_{j+1}), every branch out = g * fresh + (1 - g) * cached, g = sigmoid(prob[j+1])
    loss    = mean over the batch of sum((teacher - student)^2 over C, H, W) + l1_weight * sum(g)

AdamW (weight decay 0) on the router logits only, routers initialised N(0, 1), no clamping — as the
reference's U-ViT trainer (``train_router_discrete.py``). Two deliberate differences, both so that the
router is trained on exactly the inputs sampling produces: x_j uses the continuous schedule at t_j
(the reference rounds to the integer step n = round(1000 t_j)), and the network gets the solver's
float time 1000 t_{j+1} (the reference feeds the rounded integer; sampling feeds the float).
Under ``torchrun`` router gradients are averaged over processes as in l2c_train. The router has 2N
rows (one per model evaluation, the reference's layout); rows 1 .. N-1 are trained.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from stepcache.errors import ConfigError
from stepcache.core.policy import Policy, PolicyConfig, register_policy
from stepcache.policies.l2c import unit_index
from stepcache.policies.l2c_dpm import staged_active_units
from stepcache.training.l2c import RouterLogits, TrainResult, _sync_grads
from stepcache.core.actions import COMPUTE, Blend
from stepcache.core.context import StepContext


@dataclass(frozen=True, eq=False)
class StagedL2CTraining(PolicyConfig):
    """Internal policy of the trainer: a step start that follows a midpoint blends, everything else computes."""

    router: RouterLogits
    method: ClassVar[str] = "l2c-train-2s"


@register_policy(StagedL2CTraining)
class StagedL2CTrainingPolicy(Policy):
    def reset(self, run) -> None:
        super().reset(run)
        self._step, self._weights, self._after_midpoint = None, None, False

    def decide(self, ctx, site, view):
        layer, branch = site.layer, site.name
        if ctx.stage == 1:  # a midpoint: computed in full; the step start that follows may blend with it
            self._after_midpoint = True
            return COMPUTE
        if not self._after_midpoint:  # the run's first step start (the trainer's step j): nothing cached yet
            return COMPUTE
        if self._step != ctx.progress:  # one sigmoid per forward, shared by every layer
            self._weights, self._step = self.config.router.beta(ctx.progress), ctx.progress
        return Blend(weight=self._weights[unit_index(layer, branch)])


@dataclass(frozen=True)
class StagedRouterTrainConfig:
    """Defaults: the reference README's U-ViT run (NFE 20, router lr 1e-3, l1 weight 0.1) except size."""

    num_steps: int = 10  # solver steps N (NFE 2N)
    l1_weight: float = 0.1
    lr: float = 1e-3
    iters: int = 200
    batch_size: int = 8  # global, split over processes
    seed: int = 0
    label_dropout: float = 0.1
    threshold: float = 0.9  # for the reported skip share

    def __post_init__(self) -> None:
        if self.num_steps < 2:
            raise ConfigError(f"router training needs at least 2 solver steps, got {self.num_steps}.")
        if self.iters < 1 or self.batch_size < 1:
            raise ConfigError("iters and batch_size must be >= 1.")
        if self.l1_weight < 0 or self.lr <= 0 or not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError("l1_weight must be >= 0, lr > 0 and label_dropout in [0, 1).")


def staged_router_loss(model, router: RouterLogits, x0, y, j: int, noise, cfg: StagedRouterTrainConfig):
    """(loss, sum-of-squares error, l1) of one batch at solver step j (0 .. N-2)."""
    from stepcache.api import apply
    from stepcache.sampling.dpm_solver import data_prediction, dpm_solver_2s_step, time_grid
    from stepcache.sampling.solver_sample import continuous_time, noise_prediction, training_schedule

    N, B = cfg.num_steps, x0.shape[0]
    schedule = training_schedule(model)
    grid = time_grid(N).to(x0.device)
    s, t = torch.ones(B, device=x0.device) * grid[j], torch.ones(B, device=x0.device) * grid[j + 1]
    eps = noise_prediction(model, y, 1.0, None)

    with apply(model, StagedL2CTraining(router)) as handle:
        handle.begin_run(N, B, stages=2)

        def eps_at(x, time_, jj, stage):
            t_model = continuous_time(model, time_)
            handle.set_step(StepContext(i=N - 1 - jj, num_steps=N, t=float(t_model[0]), stage=stage))
            return eps(x, t_model)

        with torch.no_grad():
            col = (...,) + (None,) * (x0.dim() - 1)
            x_j = schedule.alpha(s)[col] * x0 + schedule.sigma(s)[col] * noise  # (B, C, H, W)
            x_next = dpm_solver_2s_step(data_prediction(eps_at, schedule), schedule, x_j, s, t, j)
        student = eps_at(x_next, t, j + 1, 0)  # blended, differentiable in the router
    with torch.no_grad():
        teacher = eps(x_next, continuous_time(model, t))
    sos = ((teacher - student) ** 2).flatten(1).sum(dim=1).mean()
    l1 = router.beta(j + 1).sum()
    return sos + cfg.l1_weight * l1, sos, l1


@torch.no_grad()
def staged_router_error(model, data, logits: torch.Tensor, cfg: StagedRouterTrainConfig, threshold: float,
                        batch: int = 8, seed: int = 1234) -> float:
    """Mean over steps j of the error of HARD decisions (sigmoid > threshold): what sampling will see."""
    g = torch.Generator().manual_seed(seed)
    x0, y = data.batch(batch, g)
    hard = torch.where(torch.sigmoid(logits) > threshold, 30.0, -30.0)  # saturated gates: 0 or 1
    router = RouterLogits(hard.shape[0], hard.shape[1] // 2)
    router.load_table(hard)
    errs = []
    for j in range(cfg.num_steps - 1):
        noise = torch.randn(x0.shape, generator=g)
        errs.append(float(staged_router_loss(model, router, x0, y, j, noise, cfg)[1]))
    return sum(errs) / len(errs)


def train_staged_router(model, data, cfg: StagedRouterTrainConfig, *, progress: bool = False,
                        device: torch.device | None = None) -> TrainResult:
    """Train a 2N-row router for ``model`` on ``data`` (``RouterData``: x0 and labels) on ``device`` (by default
    CUDA when available)."""
    from stepcache.sampling.ddp import init_distributed

    rank, world, device = init_distributed(device)
    if cfg.batch_size % world:
        raise ConfigError(f"batch size {cfg.batch_size} is not divisible by the {world} processes.")
    null = getattr(model, "null_label", getattr(model, "num_classes", 0))
    router = RouterLogits(2 * cfg.num_steps, len(model.blocks), torch.Generator().manual_seed(cfg.seed)).to(device)
    opt = torch.optim.AdamW(router.rows, lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed * world + rank)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    result, start = TrainResult(router.table()), time.perf_counter()
    try:
        for it in range(cfg.iters):
            x0, y = data.batch(cfg.batch_size // world, g)
            j = int(torch.randint(cfg.num_steps - 1, (1,), generator=g))
            y = torch.where(torch.rand(y.shape[0], generator=g) < cfg.label_dropout, torch.full_like(y, null), y)
            noise = torch.randn(x0.shape, generator=g)
            loss, sos, _ = staged_router_loss(model, router, x0.to(device), y.to(device), j, noise.to(device), cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _sync_grads(router, world)
            opt.step()
            result.losses.append(float(loss.detach()))
            result.mse.append(float(sos.detach()))
            if progress and rank == 0 and (it + 1) % max(1, cfg.iters // 10) == 0:
                share = staged_active_units(router.table(), cfg.threshold)["skipped_share"]
                print(f"iter {it + 1}: loss {loss.item():.4g}, skipped {share:.1%} at {cfg.threshold}", flush=True)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    result.logits, result.seconds = router.table().cpu(), time.perf_counter() - start
    return result


def random_placement(like: torch.Tensor, active: int, seed: int) -> torch.Tensor:
    """Saturated logits recomputing ``active`` cache-step units at random places (rows 1..N-1 of a 2N-row
    router): the baseline a trained router must beat at the same count."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.full_like(like, -30.0)
    slots = [(j, u) for j in range(1, like.shape[0] // 2) for u in range(like.shape[1])]
    for k in torch.randperm(len(slots), generator=g)[:active].tolist():
        logits[slots[k]] = 30.0
    return logits
