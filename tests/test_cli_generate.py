"""`stepcache generate`: tiny offline pipelines of every family, saved to folders and run through the CLI."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from stepcache.cli.main import main  # noqa: E402
from stepcache.io import read_png  # noqa: E402
from pipeline_builders import save_tiny  # noqa: E402

STEPS = 6
SIZE = ["--height", "16", "--width", "16"]


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {name: save_tiny(name, root / name) for name in ("dit", "pixart", "sd3", "flux")}


def _request(name):
    """Two images: class labels for DiT, prompts (one with a word the tokenizer does not know) otherwise."""
    if name == "dit":
        return ["--class-label", "3", "--class-label", "7"]
    return ["--prompt", "a red cat", "--prompt", "the blue zebra"] + SIZE


def _generate(folder, name, out, *extra):
    return main(["generate", "--pipeline", folder, *_request(name), "--num-inference-steps", str(STEPS),
                 "--seed", "5", "--out-dir", str(out), "--device", "cpu", *extra])


def _err(capsys, code):
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("stepcache")]
    assert code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("name", ["dit", "pixart", "sd3", "flux"])
def test_generate_writes_pngs_and_a_record_and_caching_saves_work(folders, name, tmp_path, capsys):
    out = tmp_path / "out"
    assert _generate(folders[name], name, out, "--cache", "fora", "--interval", "2", "--uncached-too",
                     "--summary") == 0
    printed = capsys.readouterr().out
    assert "policy             FORA(interval=2)" in printed and "measured speedup" in printed
    record = json.loads(next(out.glob("*.json")).read_text())
    pngs = sorted(out.glob("*.png"))
    assert [str(p) for p in pngs] == sorted(record["images"]) and len(pngs) == 2
    assert read_png(pngs[0]).shape[2] == 3
    assert record["pipeline"]["family"] == name and record["pipeline"]["source"] == folders[name]
    assert record["policy"] == {"method": "fora", "interval": 2}
    assert record["seeds"] == [5, 6] and record["device"] == "cpu" and record["dtype"] == "fp32"
    assert record["environment"]["diffusers"] and record["config"]["num_sampling_steps"] == STEPS
    res = record["result"]
    assert res["nfe"] == STEPS and 0 < res["macs_executed"] < res["macs_uncached"]
    assert res["step_kinds"]["reuse"] > 0 and res["seconds"] > 0
    assert len(res["psnr_db_vs_uncached"]) == 2 and res["measured_speedup"] > 0


@pytest.mark.parametrize("name", ["dit", "flux"])
def test_cache_none_equals_the_plain_pipeline_bit_for_bit(folders, name, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "out"
    assert _generate(folders[name], name, out, "--cache", "none", "--uncached-too") == 0
    record = json.loads(next(out.glob("*.json")).read_text())
    assert record["policy"] == {"method": "none"}
    assert record["result"]["macs_executed"] == record["result"]["macs_uncached"] > 0
    assert record["result"]["psnr_db_vs_uncached"] == [float("inf")] * 2
    pipe = DiffusionPipeline.from_pretrained(folders[name])
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    if name == "dit":
        plain = torch.from_numpy(pipe(class_labels=[3, 7], generator=gens, num_inference_steps=STEPS,
                                      output_type="np").images).permute(0, 3, 1, 2)
    else:
        plain = pipe(prompt=["a red cat", "the blue zebra"], generator=gens, num_inference_steps=STEPS, height=16,
                     width=16, output_type="pt").images
    expected = ((plain.float() * 2 - 1).clamp(-1, 1) + 1).mul(127.5).round().to(torch.uint8)
    expected = expected.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    got = np.stack([read_png(p) for p in record["images"]])
    assert np.array_equal(got, expected)


def test_dit_class_names_and_ids_name_the_same_classes(folders, tmp_path):
    by_name, by_id = tmp_path / "a", tmp_path / "b"
    assert main(["generate", "--pipeline", folders["dit"], "--prompt", "tabby cat", "--prompt", "cock",
                 "--num-inference-steps", "3", "--out-dir", str(by_name)]) == 0
    assert main(["generate", "--pipeline", folders["dit"], "--class-label", "3", "--prompt", "7",
                 "--num-inference-steps", "3", "--out-dir", str(by_id)]) == 0
    a = json.loads(next(by_name.glob("*.json")).read_text())["images"]
    b = json.loads(next(by_id.glob("*.json")).read_text())["images"]
    assert all(np.array_equal(read_png(x), read_png(y)) for x, y in zip(a, b))


def test_policy_file_for_another_model_is_refused_unless_forced(folders, tmp_path, capsys):
    from stepcache import FORA
    from stepcache.policy_file import model_identity, save_policy
    from helpers import tiny_dit

    path = save_policy(tmp_path / "p.json", FORA(2), {"model": model_identity(tiny_dit(), "tiny"),
                                                      "sampler": "ddim", "num_steps": STEPS})
    msg = _err(capsys, _generate(folders["flux"], "flux", tmp_path / "o", "--policy", str(path)))
    assert "was tuned for a DiT model, not a FluxTransformer2DModel" in msg and "--force" in msg
    assert _generate(folders["flux"], "flux", tmp_path / "o", "--policy", str(path), "--force") == 0
    record = json.loads(next((tmp_path / "o").glob("*.json")).read_text())
    assert record["policy"] == {"method": "fora", "interval": 2}


def test_policy_file_for_this_pipeline_is_used_and_a_step_count_is_checked(folders, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    from stepcache import FORA
    from stepcache.policy_file import model_identity, save_policy

    pipe = DiffusionPipeline.from_pretrained(folders["dit"])
    tuned = {"model": model_identity(pipe.transformer, folders["dit"]), "sampler": type(pipe.scheduler).__name__,
             "num_steps": STEPS}
    path = save_policy(tmp_path / "p.json", FORA(3), tuned)
    assert _generate(folders["dit"], "dit", tmp_path / "o", "--policy", str(path)) == 0
    assert json.loads(next((tmp_path / "o").glob("*.json")).read_text())["policy"]["interval"] == 3
    code = main(["generate", "--pipeline", folders["dit"], "--class-label", "1", "--num-inference-steps", "4",
                 "--out-dir", str(tmp_path / "o2"), "--policy", str(path)])
    assert f"{STEPS} sampling steps, not 4" in _err(capsys, code)


def test_bad_inputs_end_in_one_sentence(folders, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "o")
    missing = str(tmp_path / "nowhere")
    msg = _err(capsys, main(["generate", "--pipeline", missing, "--prompt", "a cat", "--out-dir", out]))
    assert f"Pipeline folder {missing} does not exist." in msg
    msg = _err(capsys, main(["generate", "--pipeline", str(tmp_path), "--prompt", "a cat", "--out-dir", out]))
    assert "no model_index.json" in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _err(capsys, main(["generate", "--pipeline", "nobody/no-such-pipeline", "--prompt", "a", "--out-dir", out]))
    assert "HF_HUB_OFFLINE" in msg and "local folder" in msg
    with pytest.raises(SystemExit) as exit_:  # argparse: one line, exit 2
        main(["generate", "--pipeline", folders["dit"], "--prompt", "a", "--cache", "nope", "--out-dir", out])
    msg = _err(capsys, exit_.value.code)
    assert "unknown cache method 'nope'" in msg
    msg = _err(capsys, main(["generate", "--pipeline", folders["dit"], "--out-dir", out]))
    assert "at least one --prompt" in msg
    msg = _err(capsys, _generate(folders["pixart"], "dit", tmp_path / "o"))  # class labels to a text pipeline
    assert "takes text prompts" in msg
    msg = _err(capsys, main(["generate", "--pipeline", folders["dit"], "--prompt", "zebra", "--out-dir", out]))
    assert "'zebra' is not a class name of this DiT pipeline (e.g. cock, golden retriever, tabby)" in msg
    msg = _err(capsys, main(["generate", "--pipeline", folders["dit"], "--class-label", "5000", "--out-dir", out]))
    assert "outside this DiT's 0..999" in msg
    msg = _err(capsys, main(["generate", "--pipeline", folders["dit"], "--class-label", "1", "--cache", "fora",
                             "--fresh-ratio", "0.5", "--out-dir", out]))
    assert "does not apply to --cache fora" in msg


def test_unsupported_pipeline_class_lists_the_supported_ones(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(tmp_path / "ddpm"))
    msg = _err(capsys, main(["generate", "--pipeline", str(tmp_path / "ddpm"), "--prompt", "a",
                             "--out-dir", str(tmp_path / "o")]))
    assert msg.endswith("DDPMPipeline is not a supported pipeline; supported: DiTPipeline, PixArtAlphaPipeline, "
                        "PixArtSigmaPipeline, StableDiffusion3Pipeline, FluxPipeline.")


def test_generate_in_bfloat16(folders, tmp_path):
    out = tmp_path / "out"
    assert _generate(folders["flux"], "flux", out, "--dtype", "bf16", "--cache", "fora:interval=3") == 0
    record = json.loads(next(out.glob("*.json")).read_text())
    assert record["dtype"] == "bf16" and record["result"]["step_kinds"]["reuse"] > 0
    assert all(read_png(p).shape == (16, 16, 3) for p in record["images"])
