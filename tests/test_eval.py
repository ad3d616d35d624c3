"""ADM metrics on closed-form cases and against independent numpy/scipy/sklearn formulas; npz pipeline; eval CLI."""

import hashlib
import json
import urllib.error

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from stepcache.cli.main import main
from stepcache.errors import ConfigError, ModelMismatchError
from stepcache.eval import adm, features
from stepcache.eval.features import ImageFeatures, tf_bilinear_resize
from stepcache.eval.metrics import FeatureStats, frechet_distance, inception_score, precision_recall, softmax


def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _fd_eigh(mu1, s1, mu2, s2):
    """Independent Frechet distance: Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), via symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def test_feature_stats_are_float64_mean_and_unbiased_cov():
    x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    s = FeatureStats.from_features(x)
    assert s.mu.dtype == np.float64 and s.sigma.shape == (6, 6)
    np.testing.assert_allclose(s.mu, x.astype(np.float64).mean(0))
    np.testing.assert_allclose(s.sigma, np.cov(x.astype(np.float64), rowvar=False))
    assert abs(s.frechet_distance(s)) < 1e-9


def test_frechet_distance_known_gaussians():
    # Diagonal covariances: d = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 2.0])
    expected = 9.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # General (non-commuting) SPD matrices against the independent eigh formula.
    rng = np.random.default_rng(1)
    for d in (2, 16, 64):
        m1, m2, s1, s2 = rng.normal(size=d), rng.normal(size=d), _spd(rng, d), _spd(rng, d)
        assert frechet_distance(m1, s1, m2, s2) == pytest.approx(_fd_eigh(m1, s1, m2, s2), rel=1e-8, abs=1e-9)


def test_frechet_distance_near_singular_and_bad_shapes():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 0.5   # rank-deficient covariances
    sx, sy = FeatureStats.from_features(x), FeatureStats.from_features(y)
    d = sx.frechet_distance(sy)
    assert np.isfinite(d) and d > 0
    with pytest.raises(ConfigError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ConfigError):
        FeatureStats.from_features(np.zeros((1, 3)))


def test_inception_score_closed_forms_and_splits():
    assert inception_score(np.full((100, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)        # uniform: 1
    onehot = np.eye(10)[np.arange(100) % 10]
    assert inception_score(onehot) == pytest.approx(10.0, rel=1e-12)                           # confident, balanced: C
    p = softmax(np.random.default_rng(3).normal(size=(30, 5)) * 3)
    # Independent: exp(mean KL(p(y|x) || p(y))) per split of 10 (scipy's entropy), mean over the 3 splits.
    from scipy.stats import entropy

    want = np.mean([np.exp(np.mean([entropy(r, c.mean(0)) for r in c])) for c in (p[:10], p[10:20], p[20:])])
    assert inception_score(p, split_size=10) == pytest.approx(want, rel=1e-10)


def _pr_bruteforce(ref, gen, k=3):
    """Independent improved precision/recall: sklearn-free brute force with scipy cdist (Euclidean)."""
    def radii(x):
        return np.sort(cdist(x, x), axis=1)[:, k]
    r_ref, r_gen = radii(ref), radii(gen)
    d = cdist(gen, ref)                                         # (N2, N1)
    precision = np.mean((d <= r_ref[None, :]).any(axis=1))
    recall = np.mean((d.T <= r_gen[None, :]).any(axis=1))
    return precision, recall


def test_precision_recall_identical_disjoint_and_bruteforce():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(120, 8))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)
    ref, gen = rng.normal(size=(150, 8)), rng.normal(size=(130, 8)) * 1.5 + 0.3
    p, r = precision_recall(ref, gen, batch_size=37, dtype=torch.float64)          # batching must not matter
    assert (p, r) == pytest.approx(_pr_bruteforce(ref, gen))
    assert 0 < p < 1 and 0 < r < 1
    with pytest.raises(ConfigError):
        precision_recall(x[:3], x[:3])


def test_tf_bilinear_resize_matches_tf_legacy_formula():
    x = torch.rand(2, 3, 7, 5, dtype=torch.float64) * 255
    out = tf_bilinear_resize(x, size=11) * 128 + 128                                  # undo normalisation

    def legacy(img, size):  # TF1 ResizeBilinear(align_corners=False, half_pixel_centers=False) in numpy
        h, w = img.shape[-2:]
        ys, xs = np.arange(size) * h / size, np.arange(size) * w / size
        y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
        y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
        fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
        top = img[..., y0, :][..., x0] * (1 - fx) + img[..., y0, :][..., x1] * fx
        bot = img[..., y1, :][..., x0] * (1 - fx) + img[..., y1, :][..., x1] * fx
        return top * (1 - fy) + bot * fy

    np.testing.assert_allclose(out.numpy(), legacy(x.numpy(), 11), atol=1e-6)
    same = torch.rand(1, 3, 299, 299) * 255
    torch.testing.assert_close(tf_bilinear_resize(same), (same - 128) / 128, atol=1e-4, rtol=0)


class PixelFeatures:
    """A deterministic stand-in network: pool = mean-pooled pixels, spatial = raw pixels, probs from pool."""

    name = "pixels"

    def __call__(self, images):
        x = images.astype(np.float64) / 255.0                                          # (n, H, W, 3)
        pool = x.reshape(len(x), 4, -1, 3).mean(axis=2).reshape(len(x), -1)             # (n, 12)
        return ImageFeatures(pool, x.reshape(len(x), -1)[:, :20], softmax(pool[:, :5] * 4))


def _images(seed, n=40, hw=8):
    return np.random.default_rng(seed).integers(0, 256, size=(n, hw, hw, 3), dtype=np.uint8)


def test_reference_as_images_or_precomputed_statistics_agree(tmp_path):
    net = PixelFeatures()
    ref_imgs, samples = _images(5), _images(6)
    np.savez(tmp_path / "s.npz", arr_0=samples)
    np.savez(tmp_path / "ref_images.npz", arr_0=ref_imgs)
    feats = features.extract_features(ref_imgs, net, batch_size=7)
    stats = FeatureStats.from_features(feats.pool).to_dict() | FeatureStats.from_features(feats.spatial).to_dict("_s")
    np.savez(tmp_path / "ref_stats.npz", **stats)                                       # like VIRTUAL_*.npz's keys
    a = adm.evaluate(tmp_path / "s.npz", tmp_path / "ref_images.npz", net, batch_size=16)
    b = adm.evaluate(tmp_path / "s.npz", tmp_path / "ref_stats.npz", net)
    assert a.fid == pytest.approx(b.fid, rel=1e-10) and a.sfid == pytest.approx(b.sfid, rel=1e-10)
    assert a.precision is not None and b.precision is None and a.inception_score == b.inception_score
    same = adm.evaluate(tmp_path / "ref_images.npz", tmp_path / "ref_images.npz", net)
    assert abs(same.fid) < 1e-8 and abs(same.sfid) < 1e-8 and same.precision == same.recall == 1.0
    np.savez(tmp_path / "grey.npz", arr_0=samples[..., 0])                              # grey -> 3 channels
    assert adm.load_images(tmp_path / "grey.npz").shape == (40, 8, 8, 3)
    np.savez(tmp_path / "wide.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ModelMismatchError):
        adm.evaluate(tmp_path / "s.npz", tmp_path / "wide.npz", net)


def test_eval_cli_prints_and_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(features, "load_extractor", lambda kind, path=None, device="cpu": PixelFeatures())
    np.savez(tmp_path / "s.npz", arr_0=_images(7))
    np.savez(tmp_path / "r.npz", arr_0=_images(8))
    assert main(["eval", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz"),
                 "--features", "digits", "--out", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "e.json").read_text())
    assert f"fid: {record['result']['fid']:.4f}" in out and record["result"]["num_samples"] == 40


@pytest.mark.parametrize("argv,needle", [
    (["--samples", "/nonexistent/s.npz"], "does not exist"),
    (["--features", "inception", "--inception", "/nonexistent/dir/inception.pt"], "Inception weights"),
])
def test_eval_cli_errors_are_one_sentence(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    np.savez(tmp_path / "s.npz", arr_0=_images(9))
    base = {"--samples": str(tmp_path / "s.npz"), "--ref": str(tmp_path / "s.npz"), "--features": "digits"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    code = main(["eval"] + [x for kv in base.items() for x in kv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0]


def _offline(url, dst=None, hash_prefix=None, progress=True):
    raise urllib.error.URLError("network unreachable (test)")


def test_digit_features_offline_path_real_digits_score_perfectly(tmp_path):
    from stepcache.io import to_uint8
    from stepcache.models.embedded import digits_data

    real, _ = digits_data("test")
    np.savez(tmp_path / "real.npz", arr_0=to_uint8(real))
    net = features.load_extractor("digits")
    ref = adm.digits_reference("test", net)
    res = adm.evaluate(tmp_path / "real.npz", ref, net)
    assert abs(res.fid) < 1e-6 and res.sfid is None and res.precision == res.recall == 1.0
    assert res.inception_score > 5                                    # a trained 10-class judge is confident
    noise = adm.evaluate_features(features.extract_features(_images(10, n=60, hw=16), net), ref)
    assert noise.fid > 1.0 and noise.recall < 0.5 and noise.inception_score < res.inception_score


class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 9, 1)

    def forward(self, x):
        return self.conv(x)


class _Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for name in features.SPATIAL_PATH:
            setattr(self, name, torch.nn.Identity())
        self.mixed_6 = _Conv()


class _FakeInception(torch.nn.Module):
    """The TorchScript interface of inception-2015-12-05.pt (layers.*, return_features, no_output_bias) and its
    output sizes (2048 pool features, 1008 classes): the channel means, padded with zeros."""

    def __init__(self):
        super().__init__()
        self.layers = _Layers()
        self.fc = torch.nn.Linear(3, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False, no_output_bias: bool = False):
        feats = img.float().mean(dim=(2, 3))                                        # (N, 3)
        if return_features:
            return torch.cat([feats, feats.new_zeros(feats.shape[0], 2045)], dim=1)  # (N, 2048)
        logits = feats @ self.fc.weight.T if no_output_bias else self.fc(feats)
        return torch.softmax(logits, dim=1)


def test_inception_wrapper_plumbing_on_a_fake_torchscript(tmp_path):
    path = tmp_path / "fake.pt"
    torch.jit.script(_FakeInception()).save(str(path))
    net = features.InceptionFeatures(path)
    imgs = _images(11, n=2, hw=6)
    out = net(imgs)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).double()
    np.testing.assert_allclose(out.pool[:, :3], x.mean(dim=(2, 3)).numpy(), rtol=1e-6)  # no grad leaks either
    with torch.no_grad():
        conv = net.net.layers.mixed_6.conv(tf_bilinear_resize(x.float()))             # (2, 9, 299, 299)
    want = conv[:, :7].permute(0, 2, 3, 1).reshape(2, -1).double().numpy()            # NHWC order, as ADM
    np.testing.assert_allclose(out.spatial, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.probs.sum(1), 1.0, rtol=1e-6)
    (tmp_path / "bad.pt").write_bytes(b"not torchscript")
    with pytest.raises(features.CheckpointError):
        features.InceptionFeatures(tmp_path / "bad.pt")


def test_inception_file_is_checked_by_checksum(tmp_path, monkeypatch):
    """Issue 13 item 7: the TorchScript file was loaded without a checksum. A pinned digest is enforced; without
    one, the digest seen at the first verified load is kept beside the file and a changed file is refused."""
    monkeypatch.delenv("STEPCACHE_INCEPTION_SHA256", raising=False)
    path = tmp_path / "inception.pt"
    torch.jit.script(_FakeInception()).save(str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert features.InceptionFeatures(path, sha256=digest).sha256 == digest
    with pytest.raises(features.CheckpointError, match="checksum"):
        features.InceptionFeatures(path, sha256="0" * 64)
    monkeypatch.setenv("STEPCACHE_INCEPTION_SHA256", "1" * 64)
    with pytest.raises(features.CheckpointError, match="checksum"):
        features.InceptionFeatures(path)
    monkeypatch.delenv("STEPCACHE_INCEPTION_SHA256")
    assert (tmp_path / "inception.pt.sha256").read_text().split()[0] == digest     # remembered
    other = _FakeInception()
    torch.nn.init.ones_(other.fc.weight)
    torch.jit.script(other).save(str(path))                                        # the file is replaced
    with pytest.raises(features.CheckpointError, match="checksum"):
        features.InceptionFeatures(path)
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "linear.pt"))      # TorchScript, but not Inception
    with pytest.raises(features.CheckpointError, match="Inception"):
        features.InceptionFeatures(tmp_path / "linear.pt")


def test_reference_statistics_and_arrays_are_checked(tmp_path, capsys):
    """Issue 13 items 4 and 6: an object array as --ref was a traceback; NaN statistics gave ``fid: nan``."""
    np.savez(tmp_path / "s.npz", arr_0=_images(12))
    np.savez(tmp_path / "nan.npz", mu=np.full(3, np.nan), sigma=np.eye(3))
    np.savez(tmp_path / "inf.npz", mu=np.zeros(3), sigma=np.full((3, 3), np.inf))
    np.savez(tmp_path / "obj.npz", arr_0=np.array([{"a": 1}, None], dtype=object))
    np.savez(tmp_path / "objmu.npz", mu=np.array([1, None], dtype=object), sigma=np.eye(2))
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(4))
    for name, needle in [("nan", "NaN"), ("inf", "NaN or infinite"), ("obj", "object array"),
                         ("objmu", "object array"), ("shape", "shapes")]:
        code = main(["eval", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / f"{name}.npz"),
                     "--features", "digits", "--out", str(tmp_path / f"{name}.json")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], (name, err)
        assert not (tmp_path / f"{name}.json").exists()


def test_eval_device_runs_the_features_there(tmp_path, capsys, monkeypatch):
    """Issue 12: ``eval --device`` puts the feature network on that device (the digit classifier was left on the
    CPU); an unusable device is one sentence before any work."""
    seen = []
    real_init = features.DigitFeatures.__init__

    def spy(self, device="cpu"):
        real_init(self, device)
        seen.append((str(self.device), str(next(self.net.parameters()).device)))

    monkeypatch.setattr(features.DigitFeatures, "__init__", spy)
    np.savez(tmp_path / "s.npz", arr_0=_images(21))
    argv = ["eval", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--features", "digits",
            "--out", str(tmp_path / "e.json")]
    assert main(argv + ["--device", "cpu"]) == 0
    assert seen == [("cpu", "cpu")] and json.loads((tmp_path / "e.json").read_text())["device"] == "cpu"
    capsys.readouterr()
    bad = "tpu" if torch.cuda.is_available() else "cuda"
    assert main(argv + ["--device", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("--device" in err[0] or "CUDA" in err[0]) and len(seen) == 1
