"""`stepcache tune --pipeline`: a small search on a tiny offline pipeline, its policy file, and resume."""

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from stepcache.cli.main import main  # noqa: E402
from stepcache.errors import ConfigError  # noqa: E402
from stepcache.policy_file import load_policy  # noqa: E402
from pipeline_builders import save_tiny  # noqa: E402

STEPS = 6


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    # gain 30: the cache error reaches the decoded images (FORA(2) ~88 dB, FORA(4) ~70 dB), so PSNRs rank
    return save_tiny("dit", tmp_path_factory.mktemp("pipelines") / "dit", output_gain=30.0)


def _tune(folder, out, *extra):
    # DiT pipelines take class ids as prompts; 3 calibration prompts, the last one held out
    return main(["tune", "--pipeline", folder, "--prompt", "3", "--prompt", "7", "--prompt", "11",
                 "--heldout-prompt", "5", "--num-inference-steps", str(STEPS), "--methods", "fora",
                 "--first-chunk", "1", "--finalists", "2", "--timing-repeats", "0", "--out", str(out),
                 "--no-progress", "--device", "cpu", *extra])


def test_tune_pipeline_writes_a_policy_for_this_pipeline_and_resumes(dit_folder, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    out = tmp_path / "policy.json"
    assert _tune(dit_folder, out, "--target-speedup", "1.5") == 0
    printed = capsys.readouterr().out
    assert "chosen: fora(interval=" in printed
    doc = json.loads(out.read_text())
    tuned = doc["tuned_for"]
    assert tuned["model"]["pipeline"] == "DiTPipeline" and tuned["model"]["class"] == "DiTTransformer2DModel"
    assert tuned["model"]["scheduler"] == tuned["sampler"] == "DDIMScheduler" and tuned["num_steps"] == STEPS
    assert doc["policy"]["method"] == "fora" and tuned["prompts"]["psnr_on"] == "decoded images"
    folder = tmp_path / "policy_tune"
    header = json.loads((folder / "tune_records.jsonl").read_text().splitlines()[0])
    assert header["prompts"]["calibration"] == ["3", "7", "11"] and header["prompts"]["held_out"] == ["5"]
    assert header["prompts"]["psnr_on"] == "decoded images"
    assert (folder / "references.pt").is_file()
    evals = [json.loads(ln) for ln in (folder / "tune_records.jsonl").read_text().splitlines()[1:]]
    evals = [r for r in evals if r["kind"] == "eval"]
    psnrs = {r["label"]: r["psnr"][0] for r in evals if r["seeds"] == [0]}
    # the caching error is visible and grows with the interval: the search ranks real differences
    assert 20 < psnrs["fora(interval=4)"] < psnrs["fora(interval=2)"] < 100
    for r in evals:
        assert 0 < r["macs_executed"] < r["macs_uncached"]
    # the choice: the best calibration PSNR among the candidates measured on every calibration prompt that
    # meet 1.5x ideal (MACs pooled over the prompts)
    pooled = {}
    for r in evals:
        if set(r["seeds"]) <= {0, 1, 2}:
            p = pooled.setdefault(r["label"], {"seeds": [], "psnr": [], "ex": 0, "un": 0})
            p["seeds"] += r["seeds"]
            p["psnr"] += r["psnr"]
            p["ex"] += r["macs_executed"]
            p["un"] += r["macs_uncached"]
    full = {k: v for k, v in pooled.items() if sorted(v["seeds"]) == [0, 1, 2] and v["un"] / v["ex"] >= 1.5}
    best = max(full, key=lambda k: sum(full[k]["psnr"]))
    assert doc["label"] == best and doc["measured"]["calibration"]["ideal_speedup"] >= 1.5
    # resumed: nothing sampled again, uncached references included
    assert _tune(dit_folder, out, "--target-speedup", "1.5") == 0
    assert "runs sampled now: 0 (+0 uncached references)" in capsys.readouterr().out

    # the tuned file drives `generate` on the same pipeline, and is refused at another step count
    assert main(["generate", "--pipeline", dit_folder, "--prompt", "5", "--num-inference-steps", str(STEPS),
                 "--policy", str(out), "--out-dir", str(tmp_path / "gen")]) == 0
    assert json.loads(next((tmp_path / "gen").glob("*.json")).read_text())["policy"] == doc["policy"]
    assert main(["generate", "--pipeline", dit_folder, "--prompt", "5", "--num-inference-steps", "4",
                 "--policy", str(out), "--out-dir", str(tmp_path / "gen")]) == 2
    assert "tuned for 6 sampling steps, not 4" in capsys.readouterr().err

    pipe = DiffusionPipeline.from_pretrained(dit_folder)
    policy = load_policy(out, model=pipe, sampler="DDIMScheduler", num_steps=STEPS)
    assert policy.to_dict() == doc["policy"]
    with pytest.raises(ConfigError, match="tuned for 6 sampling steps, not 8"):
        load_policy(out, model=pipe, sampler="DDIMScheduler", num_steps=8)
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ConfigError, match="tuned for a DDIMScheduler, not a DPMSolverMultistepScheduler"):
        load_policy(out, model=pipe, num_steps=STEPS)
    assert load_policy(out, model=pipe, num_steps=STEPS, force=True).to_dict() == doc["policy"]


def test_tune_pipeline_bad_inputs(dit_folder, tmp_path, capsys):
    def err(*argv):
        code = main(["tune", *argv, "--out", str(tmp_path / "p.json"), "--no-progress"])
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("stepcache")]
        assert code == 2 and len(lines) == 1, lines
        return lines[0]

    assert "at least 2 prompts" in err("--pipeline", dit_folder, "--prompt", "3", "--target-speedup", "2")
    assert "go with --pipeline" in err("--prompt", "3", "--target-speedup", "2")
    assert "--max-fd needs the digit judge" in err("--pipeline", dit_folder, "--prompt", "3", "--prompt", "4",
                                                   "--max-fd", "3")
    assert "--model or --pipeline" in err("--pipeline", dit_folder, "--model", "DiT-S/2", "--prompt", "3",
                                          "--prompt", "4", "--target-speedup", "2")
    assert "does not exist" in err("--pipeline", str(tmp_path / "none"), "--prompt", "3", "--prompt", "4",
                                   "--target-speedup", "2")
