"""benchmarks/gpu_check.py on a tiny DiT on the CPU: every section runs (or says why not) and the record
holds what the GPU run will report."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_on_the_cpu(gpu_check, tmp_path, one_thread):
    record = gpu_check.main(["--tiny", "--device", "cpu", "--repeats", "1", "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["dtype"] == "bf16" and saved["device"] == "cpu" and saved["steps"] == 6
    native = record["sections"]["native eager"]["methods"]
    assert list(native) == list(gpu_check.NATIVE_SPECS)
    assert native["none"]["measured_speedup"] == 1.0 and native["none"]["psnr_db_vs_uncached"] == float("inf")
    fora = native["fora:interval=3"]
    assert fora["compute_share"] < 0.6 and fora["ideal_speedup"] > 1.5 and fora["peak_mib"] is None
    assert 0 < fora["psnr_db_vs_uncached"] < float("inf")  # it reused something
    l2c = native["l2c"]  # the synthetic router: about 2/3 of the units of the cache steps (every other step) reused
    assert 1.2 < l2c["ideal_speedup"] < 2.0 and 0 < l2c["psnr_db_vs_uncached"] < float("inf")
    assert "skipped" in record["sections"]["native compiled"]  # auto: compiled on CUDA only
    peers = record["sections"]["diffusers DiT eager"]
    if importlib.util.find_spec("diffusers") is None:
        assert "skipped" in peers
    else:
        methods = peers["methods"]
        # the block-work meter sees diffusers' reuse the same way as stepcache's
        assert methods["diffusers TaylorSeer(interval 3, order 1)"]["compute_share"] < 0.6
        assert methods["stepcache fora(interval=3)"]["compute_share"] < 0.6
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| native eager | fora:interval=3 |" in table and "measured / ideal" in table


def test_shell_wrapper_runs_the_script(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(SCRIPT.parent / "gpu_check.sh"), "--tiny", "--device", "cpu", "--repeats", "1",
                          "--peers", "off", "--specs", "fora:interval=2", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(record["sections"]["native eager"]["methods"]) == ["none", "fora:interval=2"]


def test_peers_use_the_converter_when_the_build_has_one(gpu_check, monkeypatch):
    """With ``stepcache.models.convert`` present, the diffusers model is made from the native weights (rebuilt in
    float32 on the CPU, equal to the timed model's), not from random ones."""
    import sys
    import types

    import torch

    pytest.importorskip("diffusers")
    seen = {}

    def to_diffusers(native):
        seen["native"] = native
        return torch.nn.Linear(2, 2)  # stands in for the converted transformer

    import stepcache.models

    fake = types.SimpleNamespace(__name__="stepcache.models.convert", to_diffusers=to_diffusers)
    monkeypatch.setitem(sys.modules, "stepcache.models.convert", fake)
    monkeypatch.setattr(stepcache.models, "convert", fake, raising=False)  # `from stepcache.models import convert`
    args = gpu_check.parse(["--tiny"])
    timed = gpu_check.native_model(args, torch.device("cpu"), torch.bfloat16)
    model, weights = gpu_check.diffusers_model(timed, args, torch.device("cpu"), torch.bfloat16)
    assert weights.startswith("converted") and next(model.parameters()).dtype == torch.bfloat16
    source = seen["native"]
    assert next(source.parameters()).dtype == torch.float32 and next(timed.parameters()).dtype == torch.bfloat16
    for (name, a), (_, b) in zip(source.state_dict().items(), timed.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), name
