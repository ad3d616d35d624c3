"""Issue 16: one policy syntax across the CLI. ``--cache fora --interval 3``, ``--cache fora:interval=3`` and
``--policies fora:interval=3`` mean the same on every subcommand that runs a model, and the setting flags come
from the policy dataclasses (cli/policy_flags.py is the one parser)."""

from __future__ import annotations

import dataclasses

import pytest

from stepcache.bench.methods import build_policy as build_spec
from stepcache.cli import policy_flags
from stepcache.cli.main import SUBCOMMANDS, build_parser
from stepcache.core.policy import PolicyConfig, policy_class
from stepcache.errors import ConfigError

REQUIRED = {"sample": [], "sample_ddp": ["--num-samples", "2", "--out-dir", "unused"],
            "generate": ["--pipeline", "x", "--prompt", "y"], "bench": [], "demo": [],
            "tune": ["--target-speedup", "2"]}
COMMANDS = [c for c in REQUIRED if c in SUBCOMMANDS]

FORMS = {
    "fora": (["--cache", "fora", "--interval", "3"], ["--cache", "fora:interval=3"],
             ["--policies", "fora:interval=3"], ["--cache", "fora", "--cache-interval", "3"]),
    "toca": (["--cache", "toca", "--interval", "4", "--fresh-ratio", "0.2"],
             ["--cache", "toca:interval=4,fresh_ratio=0.2"], ["--policies", "toca:interval=4,fresh_ratio=0.2"],
             ["--cache", "toca:interval=4", "--cache-fresh-ratio", "0.2"]),
}


def _parse(command: str, extra: list[str]):
    return build_parser().parse_args([command.replace("_", "-"), *REQUIRED[command], *extra])


def _policies(args) -> list[PolicyConfig]:
    """What a subcommand runs: its one policy, or the list a comparing subcommand measures."""
    if getattr(args, "_policy_many", False):
        return [build_spec(s, 50, "ddim") for s in policy_flags.requested_specs(args)]
    return [policy_flags.build_policy(args)]


def test_the_expected_subcommands_are_there():
    assert {"sample", "sample_ddp", "bench", "demo", "tune"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("method", sorted(FORMS))
def test_every_subcommand_accepts_the_same_forms(command, method):
    results = [_policies(_parse(command, form)) for form in FORMS[method]]
    assert all(len(r) == 1 for r in results), results
    assert all(r == results[0] for r in results), results
    expected = policy_class(method)(**{"fora": dict(interval=3), "toca": dict(interval=4, fresh_ratio=0.2)}[method])
    assert results[0][0] == expected


@pytest.mark.parametrize("command", COMMANDS)
def test_every_setting_of_every_policy_has_a_flag(command):
    """Flags generated from the dataclasses: a setting added to a policy needs no CLI edit."""
    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == command.replace("_", "-"))[1]
    options = set(sub._option_string_actions)
    for method in policy_flags.menu()[1:]:
        for f in dataclasses.fields(policy_class(method)):
            assert "--cache-" + f.name.replace("_", "-") in options, (command, method, f.name)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c in ("sample", "sample_ddp", "generate")])
def test_one_policy_subcommands_refuse_two(command):
    with pytest.raises(ConfigError, match="one policy"):
        policy_flags.build_policy(_parse(command, ["--policies", "fora:interval=2", "fora:interval=3"]))
    with pytest.raises(ConfigError, match="once"):
        policy_flags.build_policy(_parse(command, ["--policies", "fora:interval=2", "--cache", "toca"]))


@pytest.mark.parametrize("command", [c for c in COMMANDS if c in ("bench", "demo", "tune")])
def test_comparing_subcommands_add_cache_to_the_list(command):
    args = _parse(command, ["--policies", "fora:interval=2", "--cache", "toca", "--interval", "3"])
    assert policy_flags.requested_specs(args) == ["fora:interval=2", "toca:interval=3"]
    assert [p.method for p in _policies(args)] == ["fora", "toca"]


def test_a_setting_the_method_lacks_is_refused_on_every_form():
    for command in COMMANDS:
        with pytest.raises(ConfigError, match="fresh-ratio|fresh_ratio"):
            _policies(_parse(command, ["--cache", "fora", "--fresh-ratio", "0.1"]))


@pytest.mark.parametrize("command", [c for c in COMMANDS if c in ("bench", "demo")])
def test_a_policy_file_is_measured_beside_the_list(command, tmp_path):
    defaults = list(_parse(command, [])._default_specs)
    assert policy_flags.requested_specs(_parse(command, [])) == defaults
    args = _parse(command, ["--policy", str(tmp_path / "p.json")])
    assert policy_flags.requested_specs(args) == defaults + [str(tmp_path / "p.json")]
    args = _parse(command, ["--policies", "fora", "--policy", str(tmp_path / "p.json"), "--force"])
    assert policy_flags.requested_specs(args) == ["fora", str(tmp_path / "p.json") + ":force=true"]
