"""Every subcommand x corrupt and impossible inputs (issue 13, items 4-7): exit code 2, one line on stderr, no
traceback, and nothing written — the table below is the checklist; add a row for every new way to fail."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stepcache import DiT
from stepcache.cli.main import main
from stepcache.models.embedded import ASSETS
from stepcache.policies.l2c import save_router
from helpers import randomize

TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
SHIPPED_ROUTER = ASSETS / "embedded_router_ddim50.safetensors"
EMBEDDED = dict(input_size=16, patch_size=2, in_channels=1, hidden_size=128, depth=6, num_heads=4, mlp_ratio=4.0,
                class_dropout_prob=0.1, num_classes=10, learn_sigma=False)


def _pair(folder: Path, name: str, blob: bytes | None = None, config=None, sd=None) -> str:
    """A weights file ``name.safetensors`` (``blob`` bytes, or a real tiny state dict) and ``name.json`` beside."""
    path = folder / f"{name}.safetensors"
    if blob is None:
        save_file(sd, str(path))
    else:
        path.write_bytes(blob)
    if config is not None:
        (folder / f"{name}.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict:
    """Every corrupt or impossible input file, by name."""
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    sd = {k: v.contiguous() for k, v in randomize(DiT(**TINY)).state_dict().items()}
    good = _pair(d, "good", config={"model": TINY}, sd=sd)
    blob = Path(good).read_bytes()
    f = {"good": good, "dir": str(d)}
    f["trunc_st"] = _pair(d, "trunc", blob[: len(blob) // 2], {"model": TINY})
    f["garbage_st"] = _pair(d, "garbage", rng.bytes(5000), {"model": TINY})
    f["badjson"] = _pair(d, "badjson", blob, '{"model": ')
    f["listjson"] = _pair(d, "listjson", blob, "[1, 2]")
    f["unkjson"] = _pair(d, "unkjson", blob, {"model": {**TINY, "colour": "blue"}})
    f["nojson"] = _pair(d, "nojson", blob)
    save_file(sd, str(d / "metalist.safetensors"), metadata={"stepcache.dit_config": "[1, 2]"})
    save_file(sd, str(d / "metaunk.safetensors"), metadata={"stepcache.dit_config": json.dumps({"colour": 1})})
    f["metalist"], f["metaunk"] = str(d / "metalist.safetensors"), str(d / "metaunk.safetensors")
    (d / "garbage.pt").write_bytes(rng.bytes(3000))
    f["garbage_pt"] = str(d / "garbage.pt")
    # routers
    (d / "random_router.safetensors").write_bytes(rng.bytes(4000))
    f["random_router"] = str(d / "random_router.safetensors")
    rblob = SHIPPED_ROUTER.read_bytes()
    (d / "trunc_router.safetensors").write_bytes(rblob[: len(rblob) - 100])
    f["trunc_router"] = str(d / "trunc_router.safetensors")
    logits = torch.randn(50, 12)
    save_router(d / "other_model.safetensors", logits, model={"name": "x", "config": {**EMBEDDED, "hidden_size": 64}},
                sampler="ddim", sidecar=False)
    f["other_model_router"] = str(d / "other_model.safetensors")
    save_router(d / "depth3.safetensors", torch.randn(50, 6), sampler="ddim", sidecar=False)
    f["depth3_router"] = str(d / "depth3.safetensors")
    # npz files
    np.savez(d / "samples.npz", arr_0=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    np.savez(d / "obj.npz", arr_0=np.array([{"a": 1}, None], dtype=object))
    np.savez(d / "nan.npz", mu=np.full(128, np.nan), sigma=np.eye(128))
    (d / "trunc.npz").write_bytes((d / "samples.npz").read_bytes()[:300])
    with zipfile.ZipFile(d / "notnpy.npz", "w") as z:
        z.writestr("arr_0.npy", b"not an npy file")
    for name in ("samples", "obj", "nan", "trunc", "notnpy"):
        f[f"{name}_npz"] = str(d / f"{name}.npz")
    (d / "not_torchscript.pt").write_bytes(b"PK\x03\x04 nothing")
    f["not_torchscript"] = str(d / "not_torchscript.pt")
    return f


def _ddp(b, out, *extra):
    return ["sample-ddp", "--num-samples", "4", "--per-proc-batch-size", "2", "--steps", "2", "--sampler", "ddpm",
            "--out-dir", str(out), "--no-progress", *extra]


EMB = ["--model", "embedded", "--sampler", "ddim", "--num-sampling-steps", "50"]  # with the uncached baseline

# (id, argv(bad files, out folder), words the one line must contain)
CASES = [
    # ------------------------------------------------------------------ calibrate
    ("calibrate-trunc-ckpt", lambda b, o: ["calibrate", "--model", "DiT-S/8", "--ckpt", b["trunc_st"], "--out",
                                           f"{o}/cal.json"], "not a readable"),
    ("calibrate-no-pipeline", lambda b, o: ["calibrate", "--pipeline", f"{o}/missing", "--out", f"{o}/cal.json"],
     "not a folder"),
    ("calibrate-bad-cfg", lambda b, o: ["calibrate", "--cfg-scale", "0.5", "--out", f"{o}/cal.json"], "--cfg-scale"),
    ("calibrate-out-is-dir", lambda b, o: ["calibrate", "--out", o], "is a folder"),
    ("calibrate-out-under-file", lambda b, o: ["calibrate", "--out", f"{b['good']}/cal.json"], "is a file"),
    # ------------------------------------------------------------------ generate
    ("generate-missing-pipeline", lambda b, o: ["generate", "--pipeline", f"{o}/missing", "--prompt", "a cat",
                                                "--out-dir", o], "does not exist"),
    ("generate-not-a-pipeline", lambda b, o: ["generate", "--pipeline", o, "--prompt", "a cat", "--out-dir", o],
     "no model_index.json"),
    ("generate-offline-hub-id", lambda b, o: ["generate", "--pipeline", "nobody/nothing", "--prompt", "a cat",
                                              "--out-dir", o], "HF_HUB_OFFLINE"),
    ("generate-no-prompt", lambda b, o: ["generate", "--pipeline", o, "--out-dir", o], "--prompt"),
    ("generate-out-under-file", lambda b, o: ["generate", "--pipeline", o, "--prompt", "a", "--out-dir",
                                              f"{b['good']}/x"], "not a writable folder"),
    ("generate-unknown-cache", lambda b, o: ["generate", "--pipeline", o, "--prompt", "a", "--cache", "nosuch",
                                             "--out-dir", o], "unknown cache method"),
    # ------------------------------------------------------------------ convert
    ("convert-native-missing-folder", lambda b, o: ["convert", "--to", "native", "--from", f"{o}/missing", "--out",
                                                    f"{o}/x.safetensors"], "is not a folder"),
    ("convert-native-bad-suffix", lambda b, o: ["convert", "--to", "native", "--from", o, "--out", f"{o}/x.bin"],
     "must end in"),
    ("convert-diffusers-trunc-ckpt", lambda b, o: ["convert", "--to", "diffusers", "--from", b["trunc_st"], "--out",
                                                   f"{o}/hf"], "not a readable"),
    # ------------------------------------------------------------------ tune
    ("tune-zero-speedup", lambda b, o: ["tune", "--target-speedup", "0", "--out-dir", o], "speedup target"),
    ("tune-nan-psnr", lambda b, o: ["tune", "--min-psnr", "nan", "--out-dir", o], "psnr target"),
    ("tune-unknown-method", lambda b, o: ["tune", "--target-speedup", "3", "--methods", "nosuch", "--out-dir", o],
     "Unknown cache method"),
    ("tune-missing-model", lambda b, o: ["tune", "--target-speedup", "3", "--model", f"{o}/none.pt", "--out-dir", o],
     "No checkpoint"),
    # ------------------------------------------------------------------ sample
    ("sample-trunc-ckpt", lambda b, o: ["sample", "--model", "DiT-S/8", "--ckpt", b["trunc_st"], "--out-dir", o],
     "not a readable"),
    ("sample-garbage-pt", lambda b, o: ["sample", "--model", "DiT-S/8", "--ckpt", b["garbage_pt"], "--out-dir", o],
     "not a readable"),
    ("sample-meta-list", lambda b, o: ["sample", "--model", "DiT-S/8", "--ckpt", b["metalist"], "--out-dir", o],
     "not a JSON object"),
    ("sample-meta-unknown", lambda b, o: ["sample", "--model", "DiT-S/8", "--ckpt", b["metaunk"], "--out-dir", o],
     "unknown DiT argument"),
    ("sample-ckpt-is-dir", lambda b, o: ["sample", "--model", "DiT-S/8", "--ckpt", b["dir"], "--out-dir", o],
     "checkpoint"),
    ("sample-magcache-no-table", lambda b, o: ["sample", "--model", "DiT-S/8", "--random-weights", "--cache",
                                              "magcache", "--out-dir", o], "stepcache calibrate"),
    ("sample-random-router", lambda b, o: ["sample", *EMB, "--cache", "l2c", "--router", b["random_router"],
                                           "--out-dir", o], "corrupt or not a router"),
    ("sample-trunc-router", lambda b, o: ["sample", *EMB, "--cache", "l2c", "--router", b["trunc_router"],
                                          "--out-dir", o], "router"),
    ("sample-router-depth", lambda b, o: ["sample", *EMB, "--cache", "l2c", "--router", b["depth3_router"],
                                          "--out-dir", o], "3-layer"),
    ("sample-router-steps", lambda b, o: ["sample", *EMB[:-1], "20", "--cache", "l2c", "--router",
                                          str(SHIPPED_ROUTER), "--out-dir", o], "50 sampling steps"),
    ("sample-router-sampler", lambda b, o: ["sample", "--model", "embedded", "--sampler", "ddpm",
                                            "--num-sampling-steps", "50", "--cache", "l2c",
                                            "--router", str(SHIPPED_ROUTER), "--out-dir", o], "ddim sampler"),
    ("sample-router-model", lambda b, o: ["sample", *EMB, "--cache", "l2c", "--router", b["other_model_router"],
                                          "--out-dir", o], "another model"),
    ("sample-router-out-unusable", lambda b, o: ["sample", *EMB, "--cache", "l2c", "--out-dir", f"{o}/a_file"],
     "is a file"),
    ("sample-out-is-file", lambda b, o: ["sample", *EMB, "--out-dir", f"{o}/a_file"], "is a file"),
    ("sample-out-under-file", lambda b, o: ["sample", *EMB, "--out-dir", f"{o}/a_file/sub"], "not a writable"),
    ("sample-seed-huge", lambda b, o: ["sample", *EMB, "--seed", str(2**70), "--out-dir", o], "--seed"),
    ("sample-cfg-nan", lambda b, o: ["sample", *EMB, "--cfg-scale", "nan", "--out-dir", o], "--cfg-scale"),
    ("sample-cfg-inf", lambda b, o: ["sample", *EMB, "--cfg-scale", "inf", "--out-dir", o], "--cfg-scale"),
    ("sample-labels", lambda b, o: ["sample", *EMB, "--class-labels", "10", "--out-dir", o], "class labels"),
    # ------------------------------------------------------------------ sample-ddp
    ("ddp-trunc-ckpt", lambda b, o: _ddp(b, o, "--ckpt", b["trunc_st"]), "not a readable"),
    ("ddp-garbage-ckpt", lambda b, o: _ddp(b, o, "--ckpt", b["garbage_st"]), "not a readable"),
    ("ddp-bad-json", lambda b, o: _ddp(b, o, "--ckpt", b["badjson"]), "not a readable JSON"),
    ("ddp-list-json", lambda b, o: _ddp(b, o, "--ckpt", b["listjson"]), "no \"model\" object"),
    ("ddp-unknown-json", lambda b, o: _ddp(b, o, "--ckpt", b["unkjson"]), "unknown DiT argument"),
    ("ddp-no-json", lambda b, o: _ddp(b, o, "--ckpt", b["nojson"]), "missing"),
    ("ddp-ckpt-is-dir", lambda b, o: _ddp(b, o, "--ckpt", b["dir"]), "is a folder"),
    ("ddp-out-is-file", lambda b, o: _ddp(b, f"{o}/a_file", "--ckpt", b["good"]), "is a file"),
    ("ddp-seed-2**32", lambda b, o: _ddp(b, o, "--ckpt", b["good"], "--global-seed", str(2**32)), "--global-seed"),
    ("ddp-seed-negative", lambda b, o: _ddp(b, o, "--ckpt", b["good"], "--global-seed", "-1"), "--global-seed"),
    ("ddp-seed-huge", lambda b, o: _ddp(b, o, "--ckpt", b["good"], "--global-seed", str(2**70)), "--global-seed"),
    ("ddp-cfg-nan", lambda b, o: _ddp(b, o, "--ckpt", b["good"], "--cfg-scale", "nan"), "--cfg-scale"),
    ("ddp-cfg-inf", lambda b, o: _ddp(b, o, "--ckpt", b["good"], "--cfg-scale", "inf"), "--cfg-scale"),
    ("ddp-cfg-low", lambda b, o: _ddp(b, o, "--ckpt", b["good"], "--cfg-scale", "0.5"), "--cfg-scale"),
    ("ddp-random-router", lambda b, o: _ddp(b, o, "--ckpt", b["good"], "--cache", "l2c", "--router",
                                            b["random_router"]), "corrupt or not a router"),
    ("ddp-router-depth", lambda b, o: _ddp(b, o, "--ckpt", b["good"], "--cache", "l2c", "--router",
                                           str(SHIPPED_ROUTER)), "router"),
    ("ddp-bad-record", lambda b, o: _ddp(b, o, "--ckpt", b["good"]), "not a readable sample_ddp record"),
    ("ddp-foreign-pngs", lambda b, o: _ddp(b, o, "--ckpt", b["good"]), "no sample_ddp.json"),
    # ------------------------------------------------------------------ eval
    ("eval-object-samples", lambda b, o: ["eval", "--samples", b["obj_npz"], "--ref", b["samples_npz"],
                                          "--features", "digits", "--out", f"{o}/e.json"], "object array"),
    ("eval-object-ref", lambda b, o: ["eval", "--samples", b["samples_npz"], "--ref", b["obj_npz"],
                                      "--features", "digits", "--out", f"{o}/e.json"], "object array"),
    ("eval-nan-ref", lambda b, o: ["eval", "--samples", b["samples_npz"], "--ref", b["nan_npz"],
                                   "--features", "digits", "--out", f"{o}/e.json"], "NaN"),
    ("eval-trunc-npz", lambda b, o: ["eval", "--samples", b["trunc_npz"], "--ref", b["samples_npz"],
                                     "--features", "digits", "--out", f"{o}/e.json"], "npz"),
    ("eval-not-npy", lambda b, o: ["eval", "--samples", b["notnpy_npz"], "--ref", b["samples_npz"],
                                   "--features", "digits", "--out", f"{o}/e.json"], "cannot be read"),
    ("eval-samples-dir", lambda b, o: ["eval", "--samples", b["dir"], "--ref", b["samples_npz"],
                                       "--features", "digits", "--out", f"{o}/e.json"], "is a folder"),
    ("eval-out-dir", lambda b, o: ["eval", "--samples", b["samples_npz"], "--ref", b["samples_npz"],
                                   "--features", "digits", "--out", o], "is a folder"),
    ("eval-bad-inception", lambda b, o: ["eval", "--samples", b["samples_npz"], "--ref", b["samples_npz"],
                                         "--inception", b["not_torchscript"], "--out", f"{o}/e.json"],
     "not the TorchScript"),
    ("eval-batch-0", lambda b, o: ["eval", "--samples", b["samples_npz"], "--ref", b["samples_npz"],
                                   "--batch-size", "0"], "--batch-size"),
    # ------------------------------------------------------------------ bench
    ("bench-policy-typo", lambda b, o: ["bench", "--policies", "froa", "--out", f"{o}/b.jsonl"], "Unknown policy"),
    ("bench-setting-typo", lambda b, o: ["bench", "--policies", "fora:intervl=3", "--num-samples", "2",
                                         "--num-sampling-steps", "2", "--out", f"{o}/b.jsonl"], "intervl"),
    ("bench-only-unrunnable", lambda b, o: ["bench", "--policies", "l2c", "--num-samples", "2",
                                            "--num-sampling-steps", "4", "--out", f"{o}/b.jsonl"], "None of"),
    ("bench-cfg-nan", lambda b, o: ["bench", "--cfg-scale", "nan", "--out", f"{o}/b.jsonl"], "--cfg-scale"),
    ("bench-seed-negative", lambda b, o: ["bench", "--seed", "-3", "--out", f"{o}/b.jsonl"], "--seed"),
    ("bench-out-dir", lambda b, o: ["bench", "--policies", "fora", "--out", o], "is a folder"),
    ("bench-garbage-model", lambda b, o: ["bench", "--model", b["garbage_pt"], "--policies", "fora",
                                          "--out", f"{o}/b.jsonl"], "not a readable"),
    # ------------------------------------------------------------------ demo
    ("demo-policy-typo", lambda b, o: ["demo", "--policies", "tocaa", "--out-dir", o], "Unknown policy"),
    ("demo-out-is-file", lambda b, o: ["demo", "--out-dir", f"{o}/a_file"], "is a file"),
    ("demo-cfg-inf", lambda b, o: ["demo", "--cfg-scale", "inf", "--out-dir", o], "--cfg-scale"),
    # ------------------------------------------------------------------ train-router
    ("train-out-is-dir", lambda b, o: ["train-router", "--out", o, "--iters", "1"], "is a folder"),
    ("train-seed-huge", lambda b, o: ["train-router", "--seed", str(2**64), "--out", f"{o}/r.safetensors"],
     "--seed"),
    ("train-threshold-nan", lambda b, o: ["train-router", "--threshold", "nan", "--out", f"{o}/r.safetensors"],
     "--threshold"),
    ("train-dropout", lambda b, o: ["train-router", "--label-dropout", "1.5", "--out", f"{o}/r.safetensors"],
     "--label-dropout"),
    ("train-garbage-model", lambda b, o: ["train-router", "--model", b["garbage_pt"], "--out", f"{o}/r.safetensors"],
     "not a readable"),
    ("train-object-data", lambda b, o: ["train-router", "--data", b["obj_npz"], "--out", f"{o}/r.safetensors"],
     "npz"),
    # ------------------------------------------------------------------ router-report
    ("report-random-router", lambda b, o: ["router-report", b["random_router"], "--out", o],
     "corrupt or not a router"),
    ("report-trunc-router", lambda b, o: ["router-report", b["trunc_router"], "--out", o], "router"),
    ("report-router-is-dir", lambda b, o: ["router-report", b["dir"], "--out", o], "is a folder"),
    ("report-out-is-file", lambda b, o: ["router-report", str(SHIPPED_ROUTER), "--out", f"{o}/a_file"], "is a file"),
    ("report-threshold-nan", lambda b, o: ["router-report", str(SHIPPED_ROUTER), "--threshold", "nan", "--out", o],
     "--threshold"),
]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _prepare(case: str, out: Path) -> None:
    (out / "a_file").write_text("I am in the way.")
    if case == "ddp-bad-record":
        (out / "sample_ddp.json").write_text("{half a record")
    if case == "ddp-foreign-pngs":
        (out / "samples").mkdir()
        from PIL import Image

        Image.new("RGB", (8, 8)).save(out / "samples" / "000000.png")


@pytest.mark.parametrize("case,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(bad, tmp_path, capsys, monkeypatch, case, argv, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("STEPCACHE_INCEPTION", str(tmp_path / "no_inception_here.pt"))
    monkeypatch.chdir(tmp_path)

    def no_sampling(*args, **kwargs):                                  # item 5: refused before any work
        raise AssertionError("sampled before refusing")

    import stepcache.bench.runner

    monkeypatch.setattr(stepcache, "sample", no_sampling)
    monkeypatch.setattr(stepcache.bench.runner, "sample", no_sampling)
    _prepare(case, tmp_path)
    before = _files(tmp_path)
    try:
        code = main(argv(bad, str(tmp_path)))
    except SystemExit as exc:                                          # argparse: a bad value of an option
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert needle in err[0], err
    assert _files(tmp_path) == before                                  # nothing written, half or whole
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


def test_every_subcommand_has_rows():
    from stepcache.cli.main import SUBCOMMANDS

    covered = {argv(dict.fromkeys(["good", "dir", "trunc_st", "garbage_st", "badjson", "listjson", "unkjson",
                                   "nojson", "metalist", "metaunk", "garbage_pt", "random_router", "trunc_router",
                                   "other_model_router", "depth3_router", "samples_npz", "obj_npz", "nan_npz",
                                   "trunc_npz", "notnpy_npz", "not_torchscript"], "x"), "o")[0]
               for _, argv, _ in CASES}
    assert covered == {name.replace("_", "-") for name in SUBCOMMANDS}
