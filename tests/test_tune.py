"""stepcache tune: registry-driven search, successive halving, resumption, policy files, the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from helpers import tiny_dit
from stepcache import FORA, load_policy
from stepcache.core import policy as registry
from stepcache.core.actions import COMPUTE, REUSE
from stepcache.core.policy import Policy, PolicyConfig, known_methods, register_policy
from stepcache.errors import ConfigError
from stepcache.policy_file import model_identity, save_policy
from stepcache.tune.evaluate import RunSpec, figures
from stepcache.tune.records import RECORDS_NAME
from stepcache.tune.search import Target, seed_chunks
from stepcache.tune.space import enumerate_candidates, grid
from stepcache.tune.tuner import Tuner, TuneOptions

RUN = RunSpec("ddim", 6, 1.0)
pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Toy(PolicyConfig):
    """Compute every ``period`` steps, reuse in between (a policy the tuner has never heard of)."""

    period: int = 2
    method: ClassVar[str] = "toy-tune"

    @classmethod
    def search_space(cls):
        return {"period": [1, 2, 4]}


class ToyPolicy(Policy):
    def decide(self, ctx, site, view):
        return COMPUTE if ctx.progress % self.config.period == 0 else REUSE


@pytest.fixture
def toy():
    register_policy(Toy)(ToyPolicy)
    yield Toy
    registry._BY_NAME.pop(Toy.method, None)
    registry._HANDLERS.pop(Toy, None)


def make_tuner(tmp_path, methods=("fora",), target=Target("speedup", 1.5), **kw):
    model = tiny_dit(depth=2, hidden=32, heads=2, input_size=4)
    kw = {"timing_repeats": 0, **kw}
    opts = TuneOptions(target, calibration_seeds=3, held_out_seeds=2, first_chunk=1, eta=2, keep=2,
                       finalists=2, methods=methods, progress=False, **kw)
    return Tuner(model, "tiny", RUN, opts, tmp_path, judge=False, log=lambda *_: None)


# ------------------------------------------------------------------ search space
def test_grid_is_the_cartesian_product_in_declaration_order():
    assert grid({}) == [{}]
    assert grid({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]


def test_every_registered_method_is_searched_including_one_registered_later(toy, tmp_path):
    cands = enumerate_candidates(6, "ddim", embedded=False, log=lambda *_: None)
    methods = {c.method for c in cands}
    declared = {m for m in known_methods() if registry.policy_class(m).search_space()}
    assert methods == declared - {"l2c"}  # l2c: no router for this model
    assert {"fora", "toca", Toy.method} <= methods
    assert sorted(c.label for c in cands if c.method == Toy.method) == [
        "toy-tune(period=1)", "toy-tune(period=2)", "toy-tune(period=4)"]
    result = make_tuner(tmp_path, methods=("fora", Toy.method), target=Target("psnr", 0)).tune()  # all: too slow
    proxy = {c.label: result["proxy"][c.key] for c in result["candidates"] if c.key in result["proxy"]}
    assert {lab.split("(")[0] for lab in proxy} == {"fora", Toy.method}
    assert proxy["toy-tune(period=1)"].psnr == 100.0  # computes everything: the uncached images exactly
    assert proxy["toy-tune(period=1)"].ideal_speedup == 1.0
    assert proxy["toy-tune(period=4)"].ideal_speedup > proxy["toy-tune(period=2)"].ideal_speedup > 1.0


def test_seed_chunks_double_and_cover_every_seed_once():
    chunks = seed_chunks(list(range(11)), 2)
    assert [len(c) for c in chunks] == [2, 2, 4, 3]
    assert [s for c in chunks for s in c] == list(range(11))


def test_target_feasibility_and_order():
    hi, lo = figures([{"psnr": [40.0], "ssim": [0.99], "macs_executed": 1, "macs_uncached": 2}]), \
        figures([{"psnr": [30.0], "ssim": [0.9], "macs_executed": 1, "macs_uncached": 4}])
    assert (hi.ideal_speedup, lo.ideal_speedup) == (2.0, 4.0)
    speed = Target("speedup", 3)
    assert not speed.feasible(hi) and speed.feasible(lo)
    assert Target("psnr", 35).feasible(hi) and not Target("psnr", 35).feasible(lo)
    assert speed.score(hi) > speed.score(lo) and Target("psnr", 0).score(lo) > Target("psnr", 0).score(hi)
    with pytest.raises(ConfigError, match="target"):
        Target("speedup", 0.5)


# ------------------------------------------------------------------ the search
def test_winner_meets_target_and_held_out_figures_are_reported(tmp_path):
    tuner = make_tuner(tmp_path, target=Target("speedup", 1.8))
    result = tuner.tune()
    chosen = result["chosen"]
    slow = [k for k, v in tuner.proxy_speed.items() if v < 0.85 * 1.8]
    assert slow and result["compute_only"] == len(slow)  # pruned on compute alone: never sampled for quality
    assert not any(r.get("policy_key") in slow for r in tuner.store.records.values() if r["kind"] == "eval")
    assert chosen["calibration"].ideal_speedup >= 1.8 and chosen["calibration"].num_seeds == 3
    assert chosen["held_out"].num_seeds == 2
    assert chosen["gap_db"] == pytest.approx(chosen["calibration"].psnr - chosen["held_out"].psnr)
    feasible = [f for f in result["seen"].values() if f.ideal_speedup >= 1.8 and f.num_seeds == 3]
    assert chosen["calibration"].psnr == max(f.psnr for f in feasible)
    assert result["reference_runs"] == len(seed_chunks(list(range(3)), 1)) + 1  # once per chunk, + held-out


def test_measured_basis_searches_again_at_a_raised_ideal_target(tmp_path, monkeypatch):
    """Wall clock is faked (no timing in tests): every policy runs at 80% of its ideal speedup."""
    tuner = make_tuner(tmp_path, target=Target("speedup", 1.5), speedup_basis="measured", timing_repeats=1)
    monkeypatch.setattr(Tuner, "timing", lambda self, cands: {
        c.key: 0.8 * tuner.pooled(c, [self.held_out]).ideal_speedup for c in cands})
    result = tuner.tune()
    chosen = result["chosen"]
    assert result["searched_target"].value > 1.5 and chosen["measured_speedup"] >= 1.5
    assert "measured speedup" in result["why"]


def test_unreachable_target_is_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="No policy in the search space meets the target"):
        make_tuner(tmp_path, target=Target("speedup", 50)).tune()


def test_a_killed_tune_resumes_from_its_records(tmp_path, monkeypatch):
    from stepcache.tune import evaluate

    full = make_tuner(tmp_path / "a").tune()
    total = full["new_runs"]
    real, calls = evaluate.Evaluator.measure, []

    def dying(self, policy, seeds):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, policy, seeds)

    monkeypatch.setattr(evaluate.Evaluator, "measure", dying)
    with pytest.raises(KeyboardInterrupt):
        make_tuner(tmp_path / "b").tune()
    monkeypatch.setattr(evaluate.Evaluator, "measure", real)
    with open(tmp_path / "b" / RECORDS_NAME, "a") as f:
        f.write('{"kind": "eval", "key": "torn')  # a kill mid-write
    resumed = make_tuner(tmp_path / "b").tune()
    evals = sum(r["kind"] == "eval" for r in resumed_store(tmp_path / "b"))
    assert resumed["resumed_records"] > 4 and resumed["new_runs"] + resumed["resumed_records"] == total
    assert evals == sum(r["kind"] == "eval" for r in resumed_store(tmp_path / "a"))
    assert resumed["chosen"]["candidate"].label == full["chosen"]["candidate"].label
    assert resumed["chosen"]["held_out"] == full["chosen"]["held_out"]
    again = make_tuner(tmp_path / "b").tune()
    assert again["new_runs"] == 0 and again["reference_runs"] == 0  # references kept on disk too


def test_another_target_in_the_same_folder_reuses_the_measurements(tmp_path):
    make_tuner(tmp_path, target=Target("speedup", 1.5)).tune()
    quality = make_tuner(tmp_path, target=Target("psnr", 0)).tune()
    fresh = make_tuner(tmp_path / "fresh", target=Target("psnr", 0)).tune()
    assert quality["reference_runs"] == 0 and quality["new_runs"] < fresh["new_runs"]
    assert quality["chosen"]["held_out"] == fresh["chosen"]["held_out"]
    assert quality["chosen"]["calibration"].ideal_speedup == max(f.ideal_speedup for f in quality["seen"].values())


def resumed_store(folder):
    return [json.loads(line) for line in (folder / RECORDS_NAME).read_text().splitlines()[1:]]


def test_records_of_another_run_are_refused(tmp_path):
    make_tuner(tmp_path).tune()
    model = tiny_dit(depth=2, hidden=32, heads=2, input_size=4)
    opts = TuneOptions(Target("speedup", 1.5), progress=False)
    with pytest.raises(ConfigError, match="another run"):
        Tuner(model, "tiny", RunSpec("ddim", 7, 1.0), opts, tmp_path, judge=False)


# ------------------------------------------------------------------ policy files
def test_load_policy_refuses_another_model_sampler_or_step_count(tmp_path):
    model = tiny_dit(depth=2, hidden=32, heads=2, input_size=4)
    tuned_for = {"model": model_identity(model, "tiny"), "sampler": "ddim", "num_steps": 4, "cfg_scale": 1.0}  # noqa
    path = save_policy(tmp_path / "p.json", FORA(3), tuned_for)
    assert load_policy(path, model=model, sampler="ddim", num_steps=4) == FORA(3)
    assert load_policy(path, model="tiny") == FORA(3)
    cases = [({"num_steps": 5}, "4 sampling steps, not 5"), ({"sampler": "ddpm"}, "sampler 'ddim', not 'ddpm'"),
             ({"model": "embedded"}, "model 'tiny', not 'embedded'"),
             ({"model": tiny_dit(depth=3, hidden=32, heads=2, input_size=4)}, "depth=2"),
             ({"model": tiny_dit(depth=2, hidden=32, heads=2, input_size=4, seed=1)}, "other weights")]
    for kwargs, words in cases:
        with pytest.raises(ConfigError, match=words):
            load_policy(path, **kwargs)
        assert load_policy(path, force=True, **kwargs) == FORA(3)
    (tmp_path / "bad.json").write_text(json.dumps({"method": "fora"}))
    with pytest.raises(ConfigError, match="not a stepcache policy file"):
        load_policy(tmp_path / "bad.json")


# ------------------------------------------------------------------ the CLI
def test_cli_tune_end_to_end(tmp_path, capsys):
    from stepcache.cli.main import main

    out = tmp_path / "policy.json"
    argv = ["tune", "--num-sampling-steps", "3", "--target-speedup", "1.4", "--calibration-seeds", "2",
            "--held-out-seeds", "1", "--first-chunk", "1", "--timing-repeats", "1", "--methods", "fora",
            "--compare", "fora:interval=2", "--threads", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "chosen: fora(" in printed and "held-out" in printed
    policy = load_policy(out, model="embedded", sampler="ddim", num_steps=3)
    doc = json.loads(out.read_text())
    assert isinstance(policy, FORA) and doc["tuned_for"]["target"] == {
        "kind": "speedup", "value": 1.4, "basis": "ideal", "searched": {"kind": "speedup", "value": 1.4}}
    assert doc["measured"]["held_out"]["num_seeds"] == 1 and doc["measured"]["measured_speedup"] > 0
    assert "fora(interval=2)" in doc["measured"]["hand_picked"]
    folder = tmp_path / "policy_tune"
    assert (folder / "tune_pareto.png").stat().st_size > 0 and "Pareto front" in (folder / "tune_report.md").read_text()
    assert main(argv) == 0 and "runs sampled now: 0 (+0" in capsys.readouterr().out  # resumed: nothing redone
    assert main(argv[:3] + ["--target-speedup", "0.5"] + argv[5:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "target must be a finite number >= 1" in err[0]


def test_policy_file_on_sample_bench_and_demo(tmp_path, capsys):
    """A tuned policy file runs through --policy; another step count is refused (exit 2) unless --force."""
    from stepcache.cli.main import main
    from stepcache.models.embedded import load_embedded

    path = save_policy(tmp_path / "p.json", FORA(2), {"model": model_identity(load_embedded(), "embedded"),
                                                      "sampler": "ddim", "num_steps": 3, "cfg_scale": 4.0})
    sample = ["sample", "--model", "embedded", "--sampler", "ddim", "--class-labels", "3", "--policy", str(path)]
    assert main(sample + ["--num-sampling-steps", "3", "--out-dir", str(tmp_path / "s")]) == 0
    assert json.loads(next((tmp_path / "s").glob("*.json")).read_text())["policy"] == FORA(2).to_dict()
    capsys.readouterr()
    assert main(sample + ["--num-sampling-steps", "4", "--out-dir", str(tmp_path / "s4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tuned for 3 sampling steps, not 4" in err[0]
    assert main(sample + ["--num-sampling-steps", "4", "--force", "--out-dir", str(tmp_path / "s4")]) == 0
    assert main(sample + ["--num-sampling-steps", "3", "--cache", "fora", "--out-dir", str(tmp_path / "x")]) == 2
    bench = ["bench", "--policies", "fora:interval=3", "--policy", str(path), "--num-samples", "2", "--repeats", "1",
             "--warmup", "0", "--num-sampling-steps", "3", "--out", str(tmp_path / "b" / "b.jsonl")]
    assert main(bench) == 0
    labels = [json.loads(line)["label"] for line in (tmp_path / "b" / "b.jsonl").read_text().splitlines()]
    assert labels == ["none", "fora(interval=3)", "fora(interval=2)"]
    capsys.readouterr()
    assert main(["demo", "--out-dir", str(tmp_path / "d"), "--num-samples", "2", "--num-sampling-steps", "4",
                 "--policies", "fora:interval=3", "--policy", str(path), "--no-progress"]) == 2
    assert "not 4" in capsys.readouterr().err
