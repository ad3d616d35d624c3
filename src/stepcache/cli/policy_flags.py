"""Caching flags generated from the policy registry: one syntax for every subcommand that runs a model.

Every subcommand (sample, sample-ddp, generate, bench, demo, tune) accepts the same two forms:

- ``--cache METHOD`` (or ``--cache METHOD:key=value,...``) plus one flag per setting of every registered
  config dataclass (``--interval``, ``--fresh-ratio``, ``--threshold``, ...). ``--cache-<name>`` works
  everywhere, and is the only form where the subcommand has an option of that name (``bench
  --cache-warmup``). A flag left unset keeps the method's default; a flag the chosen method does not
  have is refused naming the method's settings;
- ``--policies SPEC [SPEC ...]`` with ``SPEC = METHOD[:key=value,...]`` or a policy file from ``tune``.

Subcommands that run one policy (sample, sample-ddp, generate) take one SPEC; those that compare
(bench, demo, tune) take several, and ``--cache`` adds one more. A method added to the registry gets
its flags with no edit here; this module is the one place that parses policies on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

from stepcache.core.policy import PolicyConfig, known_methods, policy_class
from stepcache.errors import ConfigError

_SKIP = {"none"}  # methods without settings worth a flag
_HIDDEN = {"calibration-recorder"}  # registered for internal runs, not on the menu


def menu() -> list[str]:
    """The methods ``--cache`` offers: the registry (test and internal policies excluded)."""
    return ["none"] + [m for m in known_methods() if m not in _SKIP | _HIDDEN and not m.startswith("test-")]


def _settings() -> dict[str, dict[str, tuple]]:
    """{setting: {method: (type hint, default)}} over the menu."""
    table: dict[str, dict[str, tuple]] = {}
    for method in menu()[1:]:
        cls = policy_class(method)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            table.setdefault(f.name, {})[method] = (hints.get(f.name, str), default)
    return table


def add_cache_options(parser: argparse.ArgumentParser, *, many: bool = False, default_specs=None,
                      files: bool = True, force_help: str | None = None) -> None:
    """``--cache`` and its generated setting flags, ``--policies`` and (``files``) ``--policy FILE`` / ``--force``.

    ``many``: the subcommand compares several policies (``--policies`` takes a list, ``default_specs`` when
    nothing is asked for); otherwise it runs the one policy of ``--cache`` or ``--policies SPEC``."""
    g = parser.add_argument_group("caching (flags generated from the policy registry)")
    g.add_argument("--cache", default="none", metavar="METHOD[:k=v,...]", type=_cache_spec,
                   help=f"caching method: {', '.join(menu())} (default: %(default)s); settings may follow as "
                        "'fora:interval=3' or as the flags below")
    shown = f" (default: {' '.join(default_specs)})" if default_specs else ""
    g.add_argument("--policies", nargs="+", default=None, metavar="SPEC",
                   help=("policy specs METHOD[:key=value,...] or tune's policy files, compared in one run; "
                         "--cache adds one more" + shown) if many else
                        "the policy as one spec METHOD[:key=value,...] (or a policy file), instead of --cache")
    if files:
        g.add_argument("--policy", type=Path, default=None, metavar="FILE",
                       help="a policy file written by `stepcache tune` (" + ("measured beside the other policies)"
                                                                             if many else "instead of --cache)"))
        g.add_argument("--force", action="store_true",
                       help=force_help or "use a --policy tuned for another model, sampler or steps")
    taken = set(parser._option_string_actions)
    dests = {}
    for name, per_method in sorted(_settings().items()):
        # --cache-<name> on every subcommand; the short --<name> too where the subcommand has no such option
        flags = [f for f in ("--" + name.replace("_", "-"), "--cache-" + name.replace("_", "-")) if f not in taken]
        uses = ", ".join(f"{m} (default {_show(d)})" for m, (_, d) in per_method.items())
        g.add_argument(*flags, dest="cache_opt_" + name, default=None, metavar="VALUE", help=f"setting of {uses}")
        dests[name] = flags[0]
    parser.set_defaults(_cache_flags=dests, _policy_many=many, _default_specs=tuple(default_specs or ()))


def _cache_spec(text: str) -> str:
    """``--cache`` checked at parse time: an unknown method is an argparse error (one line, exit 2)."""
    method = text.partition(":")[0].strip().lower()
    if method not in menu():
        raise argparse.ArgumentTypeError(f"unknown cache method {method!r}; choose one of {', '.join(menu())}")
    return text


def _show(value) -> str:
    if value is None:
        return "unset"
    return value.method if isinstance(value, PolicyConfig) else str(value)


def _single(args) -> None:
    """A one-policy subcommand given ``--policies SPEC``: the spec becomes ``--cache`` (or ``--policy``)."""
    specs = getattr(args, "policies", None)
    if not specs or getattr(args, "_policy_many", False):
        return
    if len(specs) > 1:
        raise ConfigError(f"This subcommand runs one policy; --policies got {len(specs)} ({' '.join(specs)}).")
    if str(args.cache) != "none" or getattr(args, "policy", None) is not None:
        raise ConfigError("Give the policy once: --policies SPEC, --cache METHOD or --policy FILE.")
    from stepcache.bench.methods import policy_file_spec

    file_spec = policy_file_spec(specs[0])
    if file_spec is not None:
        args.policy, args.force = Path(file_spec[0]), bool(getattr(args, "force", False) or file_spec[1])
    else:
        args.cache = _cache_spec(specs[0])
    args.policies = None


def chosen_settings(args) -> tuple[str, dict]:
    """(method, {setting: raw value}) from ``--cache`` (or a one-policy ``--policies SPEC``) and the flags set."""
    from stepcache.bench.methods import parse_spec

    _single(args)
    method, params = parse_spec(str(args.cache))
    if method not in menu():
        raise ConfigError(f"Unknown cache method {method!r}; choose one of {', '.join(menu())}.")
    flags = getattr(args, "_cache_flags", {})
    for name, flag in flags.items():
        value = getattr(args, "cache_opt_" + name, None)
        if value is not None:
            if name in params:
                raise ConfigError(f"{name} is given twice, in --cache and as {flag}.")
            params[name] = value
    if method == "none":
        if params:
            raise ConfigError(f"--cache none takes no settings, got {', '.join(sorted(params))}.")
        return method, {}
    fields = {f.name for f in dataclasses.fields(policy_class(method))}
    for name in params:
        if name not in fields:
            where = flags.get(name, name)
            raise ConfigError(f"{where} does not apply to --cache {method} "
                              f"(its settings: {', '.join(sorted(fields))}).")
    return method, params


def to_spec(method: str, params: dict) -> str:
    """``("fora", {"interval": 3})`` -> ``"fora:interval=3"`` (the inverse of ``bench.methods.parse_spec``)."""
    if not params:
        return method
    text = (v if isinstance(v, str) else json.dumps(v) for v in params.values())
    return method + ":" + ",".join(f"{k}={v}" for k, v in zip(params, text))


def requested_specs(args) -> list[str]:
    """The policy specs a comparing subcommand (bench, demo, tune) was asked for: ``--policies``, then
    ``--cache`` with its flags (the subcommand's default list when neither is given), then ``--policy FILE``.
    ``--force`` marks the policy files as usable for another model, sampler or step count."""
    from stepcache.bench.methods import policy_file_spec

    specs = list(getattr(args, "policies", None) or [])
    method, params = chosen_settings(args)
    if method != "none":
        specs.append(to_spec(method, params))
    if not specs:
        specs = list(getattr(args, "_default_specs", ()))
    if getattr(args, "policy", None) is not None:  # a tuned policy is measured beside the list (or the defaults)
        specs.append(str(args.policy))
    if getattr(args, "force", False):
        specs = [s + ":force=true" if policy_file_spec(s) and ":force" not in s else s for s in specs]
    return specs


def convert(method: str, name: str, value):
    """A raw CLI value of setting ``name`` as the config's type."""
    cls = policy_class(method)
    hint = typing.get_type_hints(cls).get(name, str)
    if not isinstance(value, str):
        return value
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if value.lower() == "none" and type(None) in typing.get_args(hint):
        return None
    for option in options:
        origin = typing.get_origin(option) or option
        try:
            if isinstance(origin, type) and issubclass(origin, PolicyConfig):
                from stepcache.bench.methods import parse_spec

                sub, params = parse_spec(value)
                return PolicyConfig.from_dict({"method": sub, **params})
            if origin is bool:
                if value.lower() in ("true", "1", "yes", "false", "0", "no"):
                    return value.lower() in ("true", "1", "yes")
                continue
            if origin is int:
                return int(value)
            if origin is float:
                return float(value)
            if origin is tuple:
                if Path(value).is_file() and str in options:
                    continue
                return tuple(float(v) for v in value.replace("[", "").replace("]", "").split(",") if v.strip())
            if origin is str:
                return value
        except (ValueError, json.JSONDecodeError):
            continue
    raise ConfigError(f"--{name.replace('_', '-')} of {method} cannot be {value!r}.")


def build_policy(args, model=None):
    """The policy config the caching flags ask for (None for no cache); bad settings raise ConfigError.

    L2C reads its router file (``--router``; the shipped one for the embedded model) and, given the
    ``model``, checks it against the model, the step count and the sampler.
    """
    method, params = chosen_settings(args)
    if getattr(args, "policy", None) is not None:
        return _from_file(args, method, params, model)
    if method == "none":
        return None
    if method == "l2c":  # the router is a file, read (and checked) by L2C.from_checkpoint
        return _l2c(args, params, model)
    params = {k: convert(method, k, v) for k, v in params.items()}
    return PolicyConfig.from_dict({"method": method, **params})


def check_fits(model, policy) -> None:
    """Install ``policy`` on ``model`` and remove it at once, so that whatever it needs of this model
    (published calibration data, capabilities, token geometry) is refused now, before an uncached
    baseline run, not after it."""
    if policy is None:
        return
    import stepcache

    stepcache.apply(model, policy).remove()


def _from_file(args, method: str, params: dict, model):
    """``--policy FILE``: checked against the sampler and step count, and against the model once loaded."""
    from stepcache.policy_file import load_policy

    if method != "none" or params:
        raise ConfigError("--policy FILE replaces --cache and its settings; give one or the other.")
    return load_policy(args.policy, model=model, sampler=args.sampler, num_steps=args.num_sampling_steps,
                       force=args.force)


def _l2c(args, params: dict, model):
    import stepcache

    router = params.pop("router", None)
    threshold = params.pop("threshold", None)
    if params:
        raise ConfigError(f"--cache l2c takes --router and --threshold, not {', '.join(sorted(params))}.")
    if router is None:
        from stepcache.bench.methods import embedded_router

        embedded = getattr(args, "model", None) == "embedded"
        shipped = embedded_router(args.num_sampling_steps, args.sampler) if embedded else None
        if shipped is None:
            raise ConfigError("--cache l2c needs --router FILE (a router is shipped only for the embedded model "
                              "with DDIM-50).")
        router = str(shipped)
    if threshold is not None:
        threshold = float(threshold)
    if model is None:
        return stepcache.L2C.from_checkpoint(router, threshold=threshold)
    return stepcache.L2C.from_checkpoint(router, threshold=threshold, model=model,
                                         num_steps=args.num_sampling_steps, sampler=args.sampler)
