"""Training Learning-to-Cache routers (Ma et al., arXiv 2406.01733, Sec. 3.3, Eq. 8-9).

The model is frozen and sampled without guidance. Per iteration one full-step index ``ts = 2t + 1``
(t uniform in [0, S/2)) is drawn for the local batch; with label dropout 0.1 (one draw shared by
the three forwards)::

    x_t    = q_sample(x0, ts, noise)                      # no grad
    x_next = ddim_step(model(x_t, ts), x_t, ts)           # full forward, caches each layer's A, M
    pred   = model(x_next, ts - 1) with A = b*A_fresh + (1-b)*A_cached (b = sigmoid(prob[ts-1]))
    target = model(x_next, ts - 1)                        # full forward, no grad
    loss   = mean((target - pred)^2) + lambda * sum(sigmoid(prob[ts-1]))

AdamW (weight decay 0) on the router logits only, one parameter per step as in the reference (a
step's Adam state moves only when it gets a gradient), logits clamped to [-5, 5] after each step.
With ``ste_threshold`` the forward uses ``b > theta`` and the backward the soft ``b``. Under
``torchrun`` router gradients are averaged over processes (gloo on CPU, NCCL on GPU); rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch import nn

from stepcache.errors import ConfigError, ModelMismatchError
from stepcache.core.policy import Policy, PolicyConfig, register_policy
from stepcache.policies.l2c import active_units, is_cache_step, load_router, save_router, unit_index
from stepcache.core.actions import COMPUTE, Blend
from stepcache.core.context import StepContext
from stepcache.sampling.ddp import init_distributed


# ---------------------------------------------------------------------------------------- router
class _STE(torch.autograd.Function):
    """Straight-through threshold: forward ``b > theta`` (float), backward the identity."""

    @staticmethod
    def forward(ctx, beta, theta):
        return (beta > theta).float()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class RouterLogits(nn.Module):
    """S learnable vectors of 2*depth logits (``prob[i]`` in the paper's code), one Parameter per step."""

    def __init__(self, num_steps: int, depth: int, generator: torch.Generator | None = None):
        super().__init__()
        self.rows = nn.ParameterList([nn.Parameter(torch.randn(2 * depth, generator=generator))
                                      for _ in range(num_steps)])

    def table(self) -> torch.Tensor:
        """(S, 2*depth) detached logits."""
        return torch.stack([p.detach() for p in self.rows])

    def load_table(self, table: torch.Tensor) -> None:
        with torch.no_grad():
            for p, row in zip(self.rows, table):
                p.copy_(row)

    def beta(self, i: int) -> torch.Tensor:
        return torch.sigmoid(self.rows[i])  # (2D,)

    def clamp_(self, bound: float) -> None:
        with torch.no_grad():
            for p in self.rows:
                p.clamp_(-bound, bound)


@dataclass(frozen=True, eq=False)
class L2CTraining(PolicyConfig):
    """Internal policy of the trainer: full steps compute; cache steps blend fresh and cached outputs."""

    router: RouterLogits = field(repr=False)
    ste_threshold: float | None = None
    method: ClassVar[str] = "l2c-train"


@register_policy(L2CTraining)
class L2CTrainingPolicy(Policy):
    def reset(self, run) -> None:
        super().reset(run)
        self._step, self._weights = None, None

    def decide(self, ctx, site, view):
        if not is_cache_step(ctx.i, ctx.num_steps):
            return COMPUTE
        if self._step != ctx.i:  # one sigmoid per forward, shared by every layer
            beta = self.config.router.beta(ctx.i)
            theta = self.config.ste_threshold
            self._weights = beta if theta is None else _STE.apply(beta, theta)
            self._step = ctx.i
        return Blend(weight=self._weights[unit_index(site.layer, site.name)])


# ---------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class RouterTrainConfig:
    """Hyper-parameters; defaults follow the paper's DiT-XL/2 NFE-20 run except iterations and batch."""

    num_steps: int = 20
    lam: float = 5e-6
    lr: float = 1e-3
    iters: int = 2000
    batch_size: int = 16  # global, split over processes
    seed: int = 0
    ste_threshold: float | None = None
    label_dropout: float = 0.1
    clamp: float = 5.0
    threshold: float = 0.1  # for the reported skip share and the file's default threshold
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if self.num_steps < 2 or self.num_steps % 2:
            raise ConfigError(f"router training needs an even number of sampling steps >= 2, got {self.num_steps}.")
        for name in ("iters", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.lam < 0 or self.lr <= 0 or self.clamp <= 0:
            raise ConfigError("lambda must be >= 0 and the learning rate and clamp bound > 0.")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"label_dropout must lie in [0, 1), got {self.label_dropout}.")

    def identity(self) -> dict:
        """Settings a resumed run must share with the checkpoint (iters may grow; threshold is only reported)."""
        free = ("iters", "checkpoint_every", "threshold")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in free}


@dataclass
class TrainResult:
    logits: torch.Tensor  # (S, 2*depth)
    losses: list = field(default_factory=list)  # total loss per iteration (this process)
    mse: list = field(default_factory=list)
    seconds: float = 0.0
    start_iteration: int = 0


# ---------------------------------------------------------------------------------------- one iteration
def router_loss(model, diffusion, router: RouterLogits, x0, y, ts: int, noise, drop, cfg: RouterTrainConfig):
    """(loss, mse, l1) of the paper's objective for one batch at full step ``ts`` (odd)."""
    from stepcache.api import apply
    from stepcache.sampling.samplers import ddim_step

    B, S = x0.shape[0], diffusion.num_steps
    y = torch.where(drop, torch.full_like(y, model.num_classes), y)  # label dropout (shared)
    i_full = torch.full((B,), ts, dtype=torch.long, device=x0.device)
    i_cache = i_full - 1
    with apply(model, L2CTraining(router, cfg.ste_threshold)) as handle:
        handle.begin_run(S, B)
        handle.set_step(StepContext(ts, S, float(diffusion.timestep_map[ts])))
        with torch.no_grad():
            x_t = diffusion.q_sample(x0, i_full, noise)  # (B, C, H, W)
            out = model(x_t, diffusion.model_timesteps(i_full), y)
            x_next = ddim_step(diffusion, out, x_t, i_full, torch.Generator(device=x0.device))
        handle.set_step(StepContext(ts - 1, S, float(diffusion.timestep_map[ts - 1])))
        pred = model(x_next, diffusion.model_timesteps(i_cache), y)  # blended, differentiable
    with torch.no_grad():
        target = model(x_next, diffusion.model_timesteps(i_cache), y)
    mse = ((target - pred) ** 2).mean()
    l1 = router.beta(ts - 1).sum()
    return mse + cfg.lam * l1, mse, l1


@torch.no_grad()
def router_mse(model, data, logits: torch.Tensor, cfg: RouterTrainConfig, batch: int = 8, seed: int = 1234) -> float:
    """Mean of the objective's MSE over every cache step on one fixed batch (no dropout): lower is better."""
    from stepcache.diffusion.schedule import Diffusion

    g = torch.Generator().manual_seed(seed)
    x0, y = data.batch(batch, g)
    router = RouterLogits(logits.shape[0], logits.shape[1] // 2)
    router.load_table(logits)
    diffusion, drop = Diffusion(cfg.num_steps), torch.zeros(batch, dtype=torch.bool)
    total = []
    for ts in range(1, cfg.num_steps, 2):
        noise = torch.randn(x0.shape, generator=g)
        total.append(float(router_loss(model, diffusion, router, x0, y, ts, noise, drop, cfg)[1]))
    return sum(total) / len(total)


def _draw(data, cfg: RouterTrainConfig, local_batch: int, g: torch.Generator, device):
    """Batch, full-step index, noise and dropout mask, all from ``g`` (fixed order: resumable)."""
    x0, y = data.batch(local_batch, g)
    ts = 2 * int(torch.randint(cfg.num_steps // 2, (1,), generator=g)) + 1
    drop = torch.rand(local_batch, generator=g) < cfg.label_dropout
    noise = torch.randn(x0.shape, generator=g)
    return x0.to(device), y.to(device), ts, noise.to(device), drop.to(device)


# ---------------------------------------------------------------------------------------- distributed
def _sync_grads(router: RouterLogits, world: int) -> None:
    """Average router gradients over processes, like DDP; a step no process used keeps grad None."""
    if world == 1:
        return
    import torch.distributed as dist

    rows = list(router.rows)
    grads = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in rows])  # (S, 2D)
    used = torch.tensor([float(p.grad is not None) for p in rows], device=grads.device)  # (S,)
    dist.all_reduce(grads)
    dist.all_reduce(used)
    for p, g, u in zip(rows, grads / world, used):
        p.grad = g.clone() if u > 0 else None


def _gather_rng(state: torch.Tensor, world: int, device) -> list[torch.Tensor]:
    if world == 1:
        return [state]
    import torch.distributed as dist

    local = state.to(device)
    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local)
    return [s.cpu() for s in out]


# ---------------------------------------------------------------------------------------- checkpoints
def _adam_tensors(opt: torch.optim.Optimizer, router: RouterLogits) -> dict:
    rows = list(router.rows)
    step = torch.zeros(len(rows))
    m, v = torch.zeros(len(rows), rows[0].numel()), torch.zeros(len(rows), rows[0].numel())
    for r, p in enumerate(rows):
        st = opt.state.get(p)
        if st:
            step[r], m[r], v[r] = float(st["step"]), st["exp_avg"].cpu(), st["exp_avg_sq"].cpu()
    return {"adam.step": step, "adam.exp_avg": m, "adam.exp_avg_sq": v}


def _load_adam(opt: torch.optim.Optimizer, router: RouterLogits, t: dict) -> None:
    state = {}
    for r, p in enumerate(router.rows):
        if t["adam.step"][r] > 0:
            state[r] = {"step": t["adam.step"][r].clone().float(), "exp_avg": t["adam.exp_avg"][r].to(p.device),
                        "exp_avg_sq": t["adam.exp_avg_sq"][r].to(p.device)}
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def save_checkpoint(path, router, opt, iteration: int, cfg, rng: list, history: dict, info: dict) -> None:
    """Router + Adam state + every process's RNG + loss history; atomic, in the router file format."""
    extra = _adam_tensors(opt, router)
    extra.update({f"rng.{k}": s for k, s in enumerate(rng)})
    extra.update({f"history.{k}": torch.tensor(v, dtype=torch.float64) for k, v in history.items()})
    save_router(path, router.table(), sidecar=False, extra_tensors=extra, iteration=iteration,
                world_size=len(rng), train=cfg.identity(), **info)


def load_checkpoint(path, cfg: RouterTrainConfig, world: int) -> tuple[dict, dict]:
    """(tensors, metadata) of a training checkpoint, refusing one from other settings."""
    from safetensors.torch import load_file

    _, meta = load_router(path)
    if "iteration" not in meta:
        raise ConfigError(f"{path} is a router without training state; it cannot be resumed.")
    if meta["train"] != cfg.identity():
        diff = sorted(k for k in cfg.identity() if meta["train"].get(k) != cfg.identity()[k])
        raise ConfigError(f"{path} was trained with other settings ({', '.join(diff)}); resume with the same ones.")
    if meta["world_size"] != world:
        raise ConfigError(f"{path} was written by {meta['world_size']} processes; resume with the same number, "
                          f"not {world}.")
    return load_file(str(path)), meta


# ---------------------------------------------------------------------------------------- loop
def model_identity(model, name: str | None = None) -> dict:
    from stepcache.models.dit import config_dict

    return {"name": name, "family": "dit", "config": config_dict(model)}


def _progress(enabled: bool, total: int, start: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="router", dynamic_ncols=True)


def skip_share(router: RouterLogits, threshold: float) -> float:
    return active_units(router.table(), threshold)["skipped_share"]


def train_router(model, data, cfg: RouterTrainConfig, *, checkpoint: str | Path | None = None,
                 resume: bool = False, model_name: str | None = None, progress: bool = True,
                 on_step: Callable[[int, float], None] | None = None,
                 device: torch.device | None = None) -> TrainResult:
    """Train a router for ``model`` on ``data`` (:class:`~stepcache.training.l2c_data.RouterData`).

    ``checkpoint``: written every ``cfg.checkpoint_every`` iterations and at the end (rank 0);
    with ``resume`` the run continues from it, bit for bit as if never interrupted.
    ``on_step(iteration, loss)`` is called after each iteration (1-based). ``device``: where to train (see
    :func:`stepcache.sampling.ddp.init_distributed`; by default CUDA when available).
    """
    from stepcache.diffusion.schedule import Diffusion
    from stepcache.training.l2c_data import check_data

    check_data(data, model)
    if cfg.label_dropout > 0 and model.config.class_dropout_prob <= 0:
        raise ConfigError("this model has no null label; train its router with label_dropout=0.")
    rank, world, device = init_distributed(device)
    if cfg.batch_size % world:
        raise ConfigError(f"batch size {cfg.batch_size} is not divisible by the {world} processes.")
    diffusion = Diffusion(cfg.num_steps)
    router = RouterLogits(cfg.num_steps, len(model.blocks), torch.Generator().manual_seed(cfg.seed)).to(device)
    opt = torch.optim.AdamW(router.rows, lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed * world + rank)
    start, history = 0, {"loss": [], "mse": []}
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        tensors, meta = load_checkpoint(checkpoint, cfg, world)
        if tensors["routers"].shape != router.table().shape:
            raise ModelMismatchError(f"{checkpoint} holds a router of shape {tuple(tensors['routers'].shape)}, "
                                     f"not {tuple(router.table().shape)} for this model.")
        router.load_table(tensors["routers"])
        _load_adam(opt, router, tensors)
        g.set_state(tensors[f"rng.{rank}"])
        start = int(meta["iteration"])
        history = {k: tensors[f"history.{k}"].tolist() for k in history}
    info = {"model": model_identity(model, model_name), "sampler": "ddim", "threshold": cfg.threshold,
            "lambda": cfg.lam, "lr": cfg.lr, "data": getattr(data, "source", "")}
    result = TrainResult(router.table(), seconds=0.0, start_iteration=start)
    if start >= cfg.iters:
        result.losses, result.mse = history["loss"], history["mse"]
        return result
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    bar = _progress(progress and rank == 0, cfg.iters, start)
    t0 = time.perf_counter()
    try:
        for it in range(start, cfg.iters):
            x0, y, ts, noise, drop = _draw(data, cfg, cfg.batch_size // world, g, device)
            loss, mse, _ = router_loss(model, diffusion, router, x0, y, ts, noise, drop, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _sync_grads(router, world)
            opt.step()
            router.clamp_(cfg.clamp)
            history["loss"].append(float(loss.detach()))
            history["mse"].append(float(mse.detach()))
            done = it + 1
            if done % cfg.checkpoint_every == 0 or done == cfg.iters:
                _write(checkpoint, router, opt, done, cfg, g, history, info, rank, world, device)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}", skip=f"{skip_share(router, cfg.threshold):.1%}")
            if on_step is not None:
                on_step(done, float(loss.detach()))
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        if bar is not None:
            bar.close()
    result.logits, result.losses, result.mse = router.table().cpu(), history["loss"], history["mse"]
    result.seconds = time.perf_counter() - t0
    return result


def _write(checkpoint, router, opt, done, cfg, g, history, info, rank, world, device) -> None:
    if checkpoint is None:
        return
    rng = _gather_rng(g.get_state(), world, device)
    if rank == 0:
        save_checkpoint(checkpoint, router, opt, done, cfg, rng, history, info)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
