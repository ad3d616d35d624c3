"""Shared plumbing of the diffusers adapters: removable hooks on the real diffusers block modules.

A family file only declares *sites* (which sub-module of which block is a cacheable branch, and of
what kind); this module routes every site through ``handle.branch`` by patching the sub-module's
``forward`` on the instance (diffusers ``hooks/hooks.py`` style), never editing diffusers source.
The block's own ``forward`` still runs, so norms, modulation, gates and residuals are diffusers'
code: a policy that computes everything is bit-identical to the plain model. The one shortcut: a
LayerNorm declared as feeding only a site (``Site.norm``) is skipped when that site is reused.

Kinds of site:
- ``token``: a token-wise module (``FeedForward``, ``Linear``) on the image tokens; supports
  ``Partial(index)`` (gather the k rows of its input, run, scatter).
- ``cross``: a cross-attention ``Attention`` (image queries, text keys); supports ``Partial`` (only
  the selected queries; with ``need_map`` also their map rows (B, k, L)) and
  ``Compute(need_map=True)`` (head-mean softmax map (B, T, L)).
- ``self``: a self-attention ``Attention`` on the image tokens; Compute/Reuse, with a map (B, T, T).
- ``joint``: a joint text+image attention returning (image, text) outputs (SD3, FLUX); Compute/Reuse
  only. The two outputs are stored as one tensor [image; text] along dim 1.
- ``text``: a token-wise module on the text stream; Compute/Reuse only.
- ``split``: a token-wise module on a single-stream sequence [text; image] (FLUX single blocks); the
  image part supports ``Partial``; the text part is recomputed on full computations and reused on
  partial ones. Stored as [image; text] so that token index j is image token j.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from stepcache.adapters.base import Adapter, gather_tokens
from stepcache.adapters.diffusers.probes import modulated_input, supports_modulated_input
from stepcache.core.context import ModelInfo
from stepcache.errors import ClockError, ConfigError
from stepcache.adapters.diffusers.clock import adopt_from_stack
from stepcache.core.hooks import AttrPatch, ForwardPatch, eager

def diffusers_available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


@dataclass(frozen=True)
class Site:
    """One cacheable branch of a block: policy-facing ``branch`` name, block attribute ``module``, ``kind``.

    ``norm``: a block attribute (a plain LayerNorm) whose output feeds only this site, in the block's
    own code (then modulated elementwise). When the policy reuses the site, that norm is skipped: it
    returns one token, which the modulation broadcasts and the reused site never reads.
    """

    branch: str
    module: str
    kind: str
    norm: str | None = None


@dataclass(frozen=True)
class BlockGroup:
    """The blocks of one class (``block_class``, found through ``named_modules()`` in registration order, so a
    family is a declaration whatever its module lists are called) and the sites of each of its blocks.

    ``stream``: how a block takes and returns its hidden states, for spans of blocks:
    ``"hidden"`` — ``block(hidden_states, ...) -> hidden_states``; ``"pair"`` —
    ``block(hidden_states, encoder_hidden_states, ...) -> (encoder_hidden_states, hidden_states)``
    (SD3, FLUX); ``"image_pair"`` — the same inputs, returning ``(hidden_states, encoder_hidden_states)``
    (CogVideoX). A span's residual of pair blocks is [image; text] along dim 1 (image tokens first).
    """

    block_class: str
    sites: tuple[Site, ...]
    stream: str = "hidden"


class Geometry:
    """Token counts of the current model call (they depend on the resolution and prompt length)."""

    def __init__(self, num_tokens: int, grid: tuple[int, int]):
        self.num_tokens, self.grid, self.text_len = num_tokens, grid, 0


def linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per token of every ``nn.Linear`` inside ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _keys_context(attn, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    if context is None:
        return x
    return attn.norm_encoder_hidden_states(context) if attn.norm_cross else context


def _softmax_map(attn, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-head softmax attention probabilities (B, H, T, L) of queries x over keys from ctx."""
    B = x.shape[0]
    q, k = attn.to_q(x), attn.to_k(ctx)
    H = attn.heads
    hd = k.shape[-1] // H
    q, k = (z.view(B, -1, H, hd).transpose(1, 2) for z in (q, k))  # (B, H, N, hd)
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    scores = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, T, L)
    if mask is not None:
        bias = attn.prepare_attention_mask(mask, k.shape[2], B)
        scores = scores + bias.view(B, H, -1, bias.shape[-1])
    return scores.softmax(dim=-1)


def attention_with_map(attn, x: torch.Tensor, context: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None):
    """Explicit-softmax attention of a standard diffusers ``Attention`` (no RoPE).

    x (B, T, D) queries, context (B, L, Dc) keys/values (x itself if None), mask as the processor
    takes it. Returns the output (B, T, D) and the head-mean softmax map (B, T, L).
    """
    B, T, _ = x.shape
    ctx = _keys_context(attn, x, context)
    p = _softmax_map(attn, x, ctx, mask)
    v = attn.to_v(ctx)
    v = v.view(B, -1, attn.heads, v.shape[-1] // attn.heads).transpose(1, 2)
    out = (p @ v).transpose(1, 2).reshape(B, T, -1).to(x.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    return out / attn.rescale_output_factor, p.mean(dim=1)


def attention_map(attn, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Only the head-mean softmax map (B, T, L) of a standard diffusers cross-``Attention`` (queries x
    (B, T, D), keys from context (B, L, Dc)); the branch output itself comes from diffusers' own
    processor, so a step that computes everything stays bit-identical to the plain model."""
    return _softmax_map(attn, x, _keys_context(attn, x, context), mask).mean(dim=1)


def value_norms(attn, x: torch.Tensor) -> torch.Tensor:
    """Per-head L2 norms of the value vectors of the image tokens x (B, T, D) -> (B, H, T)."""
    v = attn.to_v(x)  # (B, T, H * hd)
    return torch.norm(v.view(x.shape[0], x.shape[1], attn.heads, -1), dim=-1, p=2).transpose(1, 2)


_SIGNATURES: dict = {}  # function -> inspect.Signature of its bound method (the hot path binds per call)


def _signature(forward) -> inspect.Signature:
    """``inspect.signature(forward)``, memoised per underlying function for bound methods (building a
    Signature costs tens of microseconds, as much as a small block's elementwise work)."""
    func = getattr(forward, "__func__", None)
    if func is None:  # a plain function (e.g. an earlier instance patch): not memoised
        return inspect.signature(forward)
    sig = _SIGNATURES.get(func)
    if sig is None:
        sig = _SIGNATURES[func] = inspect.signature(forward)
    return sig


def _call_args(forward, args, kwargs) -> inspect.BoundArguments:
    return _signature(forward).bind_partial(*args, **kwargs)


def _call_with(original, bound: inspect.BoundArguments, name: str, value):
    """Call ``original`` with the same arguments as ``bound`` except ``name`` = ``value``."""
    copy = inspect.BoundArguments(bound.signature, dict(bound.arguments))
    copy.arguments[name] = value
    return original(*copy.args, **copy.kwargs)


class DiffusersAdapter(Adapter):
    """Base of a declarative diffusers family: subclasses set the class attributes below."""

    class_names: tuple[str, ...] = ()  # diffusers model classes of the family
    groups: tuple[BlockGroup, ...] = ()
    timestep_scale: float = 1.0  # transformer timestep * scale == scheduler.timesteps entry
    cfg_layout: str = "uncond_first"  # or "cond_first" (DiTPipeline), "separate_calls" (FLUX true CFG)
    image_modules: tuple[str, ...] = ()  # non-block modules run on every image token (for MACs)
    text_modules: tuple[str, ...] = ()  # non-block modules run on every text token (for MACs)
    skip_unused_norms: bool = True  # skip a Site.norm when its site is reused (outputs unchanged)
    capabilities: frozenset = frozenset({"attention_map", "value_norms"})
    variant: str | None = None  # the policy variant the family's reference calls for (PixArt: "pixart")

    # ------------------------------------------------------------------ declaration helpers
    def matches(self, model) -> bool:
        return any(c.__name__ in self.class_names and c.__module__.startswith("diffusers.")
                   for c in type(model).__mro__)

    @property
    def branches(self) -> tuple[str, ...]:
        names: list[str] = []
        for group in self.groups:
            names += [s.branch for s in group.sites if s.branch not in names]
        return tuple(names)

    def blocks(self, model) -> list[tuple[nn.Module, BlockGroup]]:
        """(block, its group) in execution order: the groups in declaration order, each group's blocks in the
        order the model registered them."""
        found = []
        for g in self.groups:
            found += [(m, g) for _, m in model.named_modules() if type(m).__name__ == g.block_class]
        return found

    def default_grid(self, model) -> tuple[int, int]:
        cfg = model.config
        side = int(getattr(cfg, "sample_size", 32) or 32) // int(getattr(cfg, "patch_size", 1) or 1)
        return side, side

    def geometry(self, model, call: inspect.BoundArguments) -> tuple[int, tuple[int, int], int]:
        """(image tokens T, grid, text tokens L) of one call; latents (B, C, H, W) by default."""
        x = call.arguments["hidden_states"]
        p = int(model.config.patch_size)
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        ctx = call.arguments.get("encoder_hidden_states")
        return grid[0] * grid[1], grid, (0 if ctx is None else ctx.shape[1])

    def uncached_call(self, call: inspect.BoundArguments) -> bool:
        """True for a model call that runs without the policy (SD3's skip-layer guidance call)."""
        return False

    def info(self, model) -> ModelInfo:
        grid = self.default_grid(model)
        blocks = self.blocks(model)
        capabilities = self.capabilities
        if blocks and supports_modulated_input(blocks[0][0]):
            capabilities = capabilities | {"modulated_input"}
        return ModelInfo(depth=len(blocks), num_tokens=grid[0] * grid[1], grid=grid,
                         branches=self.branches, family=self.family, capabilities=frozenset(capabilities),
                         variant=self.variant)

    def regions(self, model) -> list[tuple[object, str]]:
        """The sites' modules (attention, feed-forward): their forwards are what a hooked site runs."""
        return [(getattr(block, s.module), "forward") for block, group in self.blocks(model) for s in group.sites
                if getattr(block, s.module, None) is not None]

    # ------------------------------------------------------------------ installation
    def install(self, model, handle, patches: list) -> None:
        refuse_diffusers_cache(model)
        for block, _group in self.blocks(model):  # refuse before patching anything
            if getattr(block, "_chunk_size", None) is not None:
                raise ConfigError(f"{type(model).__name__} has feed-forward chunking enabled; stepcache caches whole "
                                  "branch outputs: call set_chunk_feed_forward(None) (or disable_forward_chunking()).")
        geom = Geometry(handle.info.num_tokens, handle.info.grid)
        patches.append(ForwardPatch(model, lambda original: self._model_forward(model, original, handle, geom)))
        if hasattr(model, "enable_cache"):
            patches.append(AttrPatch(model, "enable_cache", _refuse_enable_cache))
        for layer, (block, group) in enumerate(self.blocks(model)):
            for site in group.sites:
                module = getattr(block, site.module, None)
                if module is None:  # e.g. SD3's last block has no text MLP
                    continue
                make = SITE_KINDS[site.kind]
                patches.append(ForwardPatch(module, lambda orig, m=module, s=site, l=layer:
                                            eager(make(orig, m, s, l, handle, geom))))
                norm = getattr(block, site.norm, None) if site.norm and self.skip_unused_norms else None
                if isinstance(norm, nn.LayerNorm):
                    patches.append(ForwardPatch(norm, lambda orig, s=site, l=layer:
                                                eager(_skippable_norm(orig, s, l, handle))))
        self.patch_blocks(model, handle, patches)
        if handle.has_spans:  # blocks as units: outermost, so a reused span skips the whole block
            for layer, (block, group) in enumerate(self.blocks(model)):
                sites = tuple((s.branch, getattr(block, s.module).forward.site_macs) for s in group.sites
                              if getattr(block, s.module, None) is not None)
                patches.append(ForwardPatch(block, lambda orig, l=layer, g=group, st=sites, b=block:
                                            eager(_span_block(orig, l, g, st, handle, b))))

    def patch_blocks(self, model, handle, patches: list) -> None:
        """Family hook: replace block forwards (FLUX's single blocks) before the span wrappers go on."""

    def _model_forward(self, model, original, handle, geom: Geometry):
        fixed_per_token = self._fixed_macs(model)

        @eager
        def begin(args, kwargs):  # the clock, geometry and accounting of one call: plain Python, never traced
            call = _call_args(original, args, kwargs)
            T, grid, L = self.geometry(model, call)
            clock = getattr(handle, "clock", None)
            set_geometry(handle, T, grid, new_run=clock is not None and clock.starting)
            geom.num_tokens, geom.grid, geom.text_len = T, grid, L
            rows = call.arguments["hidden_states"].shape[0]
            if clock is None and handle.ctx is None and adopt_from_stack(model, handle):
                clock = handle.clock
                set_geometry(handle, T, grid, new_run=True)
            if clock is not None and (clock.active or handle.ctx is None):  # else driven by hand (begin_run/set_step)
                clock.on_model_call(rows, call.arguments.get("timestep"), self)
            fixed = fixed_per_token[0] * T + fixed_per_token[1] * L + fixed_per_token[2]
            if self.uncached_call(call):
                scope = handle.uncached(rows * fixed)
                scope.__enter__()
                open_scopes.append(scope)
                return True
            handle.before_call(rows, rows * fixed)
            return False

        @eager
        def finish():
            open_scopes.pop().__exit__(None, None, None)

        open_scopes: list = []  # the uncached scope of the call in progress

        @functools.wraps(original)
        def forward(*args, **kwargs):
            if not begin(args, kwargs):
                return original(*args, **kwargs)
            try:
                return original(*args, **kwargs)
            finally:
                finish()

        return forward

    def _fixed_macs(self, model) -> tuple[int, int, int]:
        """Work outside the sites, per image token, per text token, and per row (adaLN, embeddings)."""
        site_ids = {id(getattr(b, s.module)) for b, g in self.blocks(model) for s in g.sites
                    if getattr(b, s.module, None) is not None}
        site_names = [n for n, m in model.named_modules() if id(m) in site_ids]
        per_image = per_text = per_row = 0
        for name, m in model.named_modules():
            work = _module_work(m)
            if not work or any(name == s or name.startswith(s + ".") for s in site_names):
                continue
            if any(name == n or name.startswith(n + ".") for n in self.image_modules):
                per_image += work
            elif any(name == n or name.startswith(n + ".") for n in self.text_modules):
                per_text += work
            else:
                per_row += work
        return per_image, per_text, per_row


def _span_block(original, layer: int, group: BlockGroup, sites: tuple, handle, block=None):
    """A block routed through ``handle.block`` so that spans of blocks can be computed or skipped.
    The blocks' own adaLN work is part of the model's fixed work here (a skipped block's is still counted
    as executed: the accounting errs on the side of less saving)."""
    pair = group.stream in ("pair", "image_pair")
    image_first = group.stream == "image_pair"  # CogVideoX returns (hidden, encoder)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        call = _call_args(original, args, kwargs)
        h = call.arguments["hidden_states"]  # (B, T, D)
        run = lambda: original(*args, **kwargs)  # noqa: E731
        probes = None
        if layer == 0 and block is not None and supports_modulated_input(block):  # TeaCache's indicator
            probes = {"modulated_input": lambda: modulated_input(block, call)}
        if not pair:
            return handle.block(layer, h, run, sites=sites, probes=probes)
        e = call.arguments.get("encoder_hidden_states")  # (B, L, D) or None
        T = h.shape[1]
        x = h if e is None else torch.cat([h, e], dim=1)  # (B, T + L, D)

        def hidden(out):  # (encoder, hidden) -> [image; text]; a block that drops the text keeps it as it came
            hid, enc = out if image_first else out[::-1]
            enc = e if enc is None else enc
            return hid if enc is None else torch.cat([hid, enc], dim=1)

        def passthrough(stream):
            out = (stream[:, T:] if stream.shape[1] > T else None), stream[:, :T]
            return out[::-1] if image_first else out

        return handle.block(layer, x, run, sites=sites, hidden=hidden, passthrough=passthrough, probes=probes)

    return forward


def _module_work(m: nn.Module) -> int:
    """MACs per position of a Linear or Conv2d layer (0 for anything else)."""
    if isinstance(m, nn.Linear):
        return m.in_features * m.out_features
    if isinstance(m, nn.Conv2d):
        return m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
    return 0


def set_geometry(handle, num_tokens: int, grid: tuple[int, int], new_run: bool = False) -> None:
    """Update the handle's ModelInfo to this call's token count (resolution set at call time).

    Allowed before the first model call of a run (``new_run``: a pipeline call is about to begin
    one); the handler is reset with the new info. A change in the middle of a run raises.
    """
    if (num_tokens, tuple(grid)) == (handle.info.num_tokens, tuple(handle.info.grid)):
        return
    if handle.stats().nfe and not new_run:
        raise ClockError(f"The resolution changed within a sampling run ({handle.info.num_tokens} -> "
                         f"{num_tokens} tokens); start a new run first.")
    handle.info = replace(handle.info, num_tokens=num_tokens, grid=tuple(grid))
    handle.handler.info = handle.info
    handle.stats().num_tokens = num_tokens
    if handle.run is not None:
        handle.handler.reset(handle.run)


# diffusers hooks that skip or approximate denoising work (their names in diffusers' HookRegistry); other
# hooks (layerwise casting, group offloading, context/tensor parallelism) run beside stepcache.
_CACHE_HOOK_PREFIXES = ("faster_cache", "fbc_", "mag_cache", "pyramid_attention_broadcast", "sea_cache",
                        "taylorseer_cache", "layer_skip")


def refuse_diffusers_cache(model) -> None:
    """stepcache and diffusers' own caches on one model would both skip work: refuse the combination, by name."""
    names = set()
    for m in model.modules():
        hooks = getattr(getattr(m, "_diffusers_hook", None), "hooks", None) or {}
        names |= {n for n in hooks if n.startswith(_CACHE_HOOK_PREFIXES)}
    if getattr(model, "is_cache_enabled", False) or names:
        found = ", ".join(sorted(names)) or "enable_cache"
        raise ConfigError(f"{type(model).__name__} already has a diffusers cache ({found}); call "
                          "disable_cache() before stepcache.apply().")


def _refuse_enable_cache(*args, **kwargs):
    raise ConfigError("This model has a stepcache policy applied; call handle.remove() before enable_cache().")


def _skippable_norm(original, site, layer, handle):
    """A norm that feeds only ``site``: when the policy will reuse or forecast the site (decided ahead through
    ``handle.peek``), return one token instead of normalising all of them; the block's elementwise
    modulation broadcasts it and the reused site ignores its input, so the block output is unchanged."""

    def forward(x, *args, **kwargs):  # (B, T, D)
        action = handle.peek(layer, site.branch)
        if action is not None and action.kind in ("reuse", "emit"):  # the site ignores its input
            return x[:, :1]
        return original(x, *args, **kwargs)

    return forward


# ---------------------------------------------------------------------------------- site kinds
def _token_site(original, module, site, layer, handle, geom):
    per_token = linear_macs(module)
    macs = lambda k: k * per_token  # noqa: E731

    def forward(hidden_states, *args, **kwargs):  # (B, T, D)
        return handle.branch(
            layer, site.branch,
            full=lambda: original(hidden_states, *args, **kwargs),
            tokens=lambda index: original(gather_tokens(hidden_states, index), *args, **kwargs),
            macs=macs, x=hidden_states)

    forward.site_macs = macs
    return forward


def _text_site(original, module, site, layer, handle, geom):
    per_token = linear_macs(module)
    macs = lambda k: k * geom.text_len * per_token // max(geom.num_tokens, 1)  # noqa: E731

    def forward(hidden_states, *args, **kwargs):  # (B, L, D): text stream, Compute/Reuse only
        return handle.branch(layer, site.branch, full=lambda: original(hidden_states, *args, **kwargs), macs=macs)

    forward.site_macs = macs
    return forward


def _attention_macs(module, geom, queries_all: bool, keys) -> Callable[[int], int]:
    per_token = linear_macs(module)
    inner = module.inner_dim if hasattr(module, "inner_dim") else module.to_q.out_features

    def macs(k: int) -> int:
        T = geom.num_tokens
        n = keys()
        if queries_all:  # work scales with the share of the call that ran
            full = n * per_token + 2 * n * n * inner
            return full * k // max(T, 1)
        return k * 2 * n * inner + (k * per_token if k else 0)

    return macs


def _self_site(original, module, site, layer, handle, geom):
    macs = _attention_macs(module, geom, True, lambda: geom.num_tokens)

    def forward(hidden_states, *args, **kwargs):  # (B, T, D)
        def with_map():  # binds the call only when a map is asked for (not on the Compute/Reuse hot path)
            mask = _call_args(original, (hidden_states,) + args, kwargs).arguments.get("attention_mask")
            return attention_with_map(module, hidden_states, None, mask)

        full = lambda: original(hidden_states, *args, **kwargs)  # noqa: E731
        return handle.branch(layer, site.branch, full=full, macs=macs, with_map=with_map,
                             with_values=lambda: (full(), value_norms(module, hidden_states)))

    forward.site_macs = macs
    return forward


def _cross_site(original, module, site, layer, handle, geom):
    macs = _attention_macs(module, geom, False, lambda: geom.text_len)

    def forward(*args, **kwargs):
        call = _call_args(original, args, kwargs)
        x = call.arguments["hidden_states"]  # (B, T, D) image queries
        ctx, mask = call.arguments.get("encoder_hidden_states"), call.arguments.get("attention_mask")

        def on(index):  # only the queries ``index`` (B, k)
            return _call_with(original, call, "hidden_states", gather_tokens(x, index))

        def on_with_map(index):  # the same, with the head-mean softmax map of those queries (B, k, L);
            # one explicit-softmax pass (a partial step is approximate anyway; full steps stay exact)
            return attention_with_map(module, gather_tokens(x, index), ctx, mask)

        full = lambda: original(*args, **kwargs)  # noqa: E731
        return handle.branch(layer, site.branch, full=full, tokens=on, macs=macs,
                             with_map=lambda: (full(), attention_map(module, x, ctx, mask)), x=x,
                             tokens_with_map=on_with_map)

    forward.site_macs = macs
    return forward


def _joint_site(original, module, site, layer, handle, geom):
    macs = _attention_macs(module, geom, True, lambda: geom.num_tokens + geom.text_len)

    def forward(*args, **kwargs):
        call = _call_args(original, args, kwargs)
        T = call.arguments["hidden_states"].shape[1]
        pair = call.arguments.get("encoder_hidden_states") is not None

        def full():  # (B, T [+ L], D): [image; text]
            out = original(*args, **kwargs)
            if isinstance(out, tuple):
                if len(out) != 2:
                    raise ConfigError("stepcache supports joint attention with two outputs (no IP-adapter).")
                return out[0] if out[1] is None else torch.cat(out, dim=1)
            return out

        image = call.arguments["hidden_states"]
        if pair:
            image_part = image
        else:  # single stream [text; image]
            image_part = image[:, geom.text_len:]
        out = handle.branch(layer, site.branch, full=full, macs=macs,
                            with_values=lambda: (full(), value_norms(module, image_part)))
        if not pair:
            return out
        return out[:, :T], (out[:, T:] if out.shape[1] > T else None)

    forward.site_macs = macs
    return forward


def _split_site(original, module, site, layer, handle, geom):
    per_token = linear_macs(module)
    macs = lambda k: k * per_token + (geom.text_len * per_token if k == geom.num_tokens else 0)  # noqa: E731

    def forward(hidden_states, *args, **kwargs):  # (B, L + T, D): [text; image]
        L = geom.text_len
        image = hidden_states[:, L:]  # (B, T, D)

        def full():  # stored as [image; text]
            out = original(hidden_states, *args, **kwargs)
            return torch.cat([out[:, L:], out[:, :L]], dim=1)

        out = handle.branch(layer, site.branch, full=full,
                            tokens=lambda index: original(gather_tokens(image, index), *args, **kwargs),
                            macs=macs, x=image)
        T = out.shape[1] - L
        return torch.cat([out[:, T:], out[:, :T]], dim=1)

    forward.site_macs = macs
    return forward


SITE_KINDS = {"token": _token_site, "text": _text_site, "self": _self_site, "cross": _cross_site,
              "joint": _joint_site, "split": _split_site}
