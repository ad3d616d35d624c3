"""--device / --dtype on every subcommand that runs a model: the CPU paths run, and a device this machine
lacks is refused in one sentence (exit 2) before anything is loaded or written."""

import json

import pytest
import torch

from stepcache.cli.common import DTYPES, placement, resolve_device
from stepcache.cli.main import main
from stepcache.errors import ConfigError

# the smallest argument list with which each subcommand reaches its device check (out paths filled in below)
SUBCOMMANDS = {
    "sample": ["sample", "--model", "DiT-S/8", "--random-weights", "--num-sampling-steps", "2", "--out-dir", "{out}"],
    "sample-ddp": ["sample-ddp", "--num-samples", "2", "--out-dir", "{out}"],
    "bench": ["bench", "--policies", "fora:interval=2", "--out", "{out}/b.jsonl", "--num-samples", "2"],
    "demo": ["demo", "--out-dir", "{out}", "--num-samples", "2"],
    "train-router": ["train-router", "--out", "{out}/r.safetensors", "--iters", "1"],
    "calibrate": ["calibrate", "--out", "{out}/c.json", "--num-samples", "1"],
    "tune": ["tune", "--target-speedup", "2", "--out", "{out}/p.json"],
}


def _argv(name, out, *extra):
    return [a.replace("{out}", str(out)) for a in SUBCOMMANDS[name]] + list(extra)


@pytest.fixture()
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_model_subcommand_refuses_cuda_without_cuda(name, tmp_path, capsys, no_cuda):
    out = tmp_path / "out"
    code = main(_argv(name, out, "--device", "cuda"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["stepcache: error: CUDA is not available on this machine; use --device cpu."]
    assert not out.exists()  # refused before any output was written


@pytest.mark.parametrize("name", ["sample", "bench", "calibrate"])
def test_unknown_device_is_one_sentence(name, tmp_path, capsys):
    code = main(_argv(name, tmp_path / "out", "--device", "tpu"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--device must be cpu, cuda or cuda:N" in err[0]


@pytest.mark.parametrize("name", ["sample", "sample-ddp", "bench", "demo", "calibrate", "tune"])
def test_unknown_dtype_is_an_argparse_error(name, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(_argv(name, tmp_path / "out", "--dtype", "fp8"))
    assert exc.value.code == 2


def test_resolve_device(no_cuda):
    assert resolve_device(None) == torch.device("cpu")  # the default without CUDA
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(ConfigError, match="--device must be"):
        resolve_device("not a device")


def test_placement_defaults_to_fp32():
    class Args:
        device = "cpu"

    assert placement(Args()) == (torch.device("cpu"), torch.float32)
    assert set(DTYPES) == {"fp32", "bf16", "fp16"}


def test_sample_in_bf16_on_the_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    code = main(["sample", "--model", "DiT-S/8", "--random-weights", "--num-sampling-steps", "3", "--class-labels",
                 "1", "2", "--cache", "fora", "--interval", "2", "--out-dir", str(out), "--device", "cpu",
                 "--dtype", "bf16"])
    assert code == 0
    record = json.loads(next(out.glob("*.json")).read_text())
    assert record["device"] == "cpu" and record["dtype"] == "bf16"
    assert record["result"]["macs_executed"] < record["baseline"]["macs_executed"]
    latents = torch.load(next(out.glob("*.latents.pt")))["latents"]
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()


def test_bench_in_bf16_records_the_dtype(tmp_path, capsys):
    out = tmp_path / "b.jsonl"
    code = main(["bench", "--policies", "fora:interval=2", "--out", str(out), "--num-samples", "2",
                 "--num-sampling-steps", "4", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--dtype", "bf16"])
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    assert all(r["config"]["model"]["dtype"] == "bfloat16" for r in records)
    assert all("device" not in r["config"]["model"] for r in records)  # the CPU keeps the old keys
    assert records[1]["quality"]["psnr"] > 0


def test_ddp_record_names_the_dtype_and_accepts_older_float32_records(tmp_path):
    from stepcache.sampling.ddp import RECORD, DDPSampleConfig, prepare_record

    cfg = DDPSampleConfig(num_samples=2, batch_size=2, global_seed=0, num_steps=2, sampler="ddim", cfg_scale=1.0,
                          model="embedded", policy={"method": "none"})
    record = prepare_record(tmp_path, cfg)
    assert record["config"]["dtype"] == "fp32"
    old = json.loads((tmp_path / RECORD).read_text())
    del old["config"]["dtype"]  # a record written before --dtype existed
    (tmp_path / RECORD).write_text(json.dumps(old))
    prepare_record(tmp_path, cfg)  # same float32 configuration: accepted
    bf16 = DDPSampleConfig(**{**cfg.__dict__, "dtype": "bf16"})
    with pytest.raises(ConfigError, match="--dtype"):
        prepare_record(tmp_path, bf16)
