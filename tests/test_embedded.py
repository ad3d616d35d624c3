"""The embedded digits model, its data, the digit judge and the fidelity metrics."""

from __future__ import annotations

import math

import pytest
import torch

from stepcache.errors import CheckpointError, ConfigError
from stepcache.eval.digits import classify, load_digit_classifier, score_digits
from stepcache.eval.fidelity import psnr, ssim
from stepcache.eval.metrics import FeatureStats
from stepcache.models.embedded import (DEFAULT_CFG, RESOLUTION, digits_data, embedded_config, load_embedded)


def test_digits_split_is_fixed_disjoint_and_scaled():
    xtr, ytr = digits_data("train")
    xte, yte = digits_data("test")
    assert xtr.shape == (1437, 1, RESOLUTION, RESOLUTION) and xte.shape == (360, 1, RESOLUTION, RESOLUTION)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert float(xtr.min()) >= -1.0 and float(xtr.max()) <= 1.0
    assert int(torch.bincount(yte, minlength=10).min()) >= 35  # stratified: every class held out
    assert digits_data("all")[0].shape[0] == 1437 + 360
    assert torch.equal(digits_data("test")[0], xte)  # deterministic
    with pytest.raises(ConfigError):
        digits_data("validation")


def test_classifier_clears_its_floor_on_held_out_digits():
    x, y = digits_data("test")
    _, logits = classify(x)
    acc = float((torch.from_numpy(logits).argmax(1) == y).float().mean())
    assert acc >= 0.97, acc
    net = load_digit_classifier()
    assert net.features(x[:3]).shape == (3, 128) and net.logits(x[:3]).shape == (3, 10)
    # other resolutions are resized, not rejected
    assert net.logits(torch.nn.functional.interpolate(x[:2], size=32)).shape == (2, 10)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x, y = digits_data("test")
    feats, _ = classify(x)
    stats = FeatureStats.from_features(feats)
    scores = score_digits(x, y, reference=stats)
    assert abs(scores.frechet_distance) < 1e-6
    assert scores.class_accuracy >= 0.97 and 1.0 <= scores.inception_score <= 10.0
    noisy = score_digits(x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)), y,
                         reference=stats)
    assert noisy.frechet_distance > 1.0


def test_psnr_and_ssim():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    b = a + 0.1 * torch.randn(a.shape, generator=g)
    assert math.isinf(float(psnr(a, a)[0])) and torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64))
    mse = float(((a.double() - b.double()) ** 2)[0].mean())
    assert float(psnr(a, b)[0]) == pytest.approx(10 * math.log10(4 / mse))
    s_ab, s_ba = ssim(a, b), ssim(b, a)
    assert torch.allclose(s_ab, s_ba) and bool((s_ab < 1).all()) and bool((s_ab > 0).all())
    worse = ssim(a, a + 0.4 * torch.randn(a.shape, generator=g))
    assert bool((worse < s_ab).all())
    with pytest.raises(ConfigError):
        ssim(a, b[:, :, :8])


def test_load_embedded_reports_a_missing_file(tmp_path):
    with pytest.raises(CheckpointError):
        load_embedded(path=tmp_path / "nope.safetensors")


def test_embedded_model_denoises_digits_into_their_class():
    """One-shot x0 prediction from held-out digits noised to t=400 is classified better than the noisy input."""
    from stepcache.diffusion.schedule import Diffusion

    model = load_embedded()
    x, y = digits_data("test")
    x, y = x[:80], y[:80]
    d = Diffusion(1000)
    t = torch.full((80,), 400)
    xt = d.q_sample(x, t, torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        x0 = d.predict_xstart(xt, t, model(xt, t, y)).clamp(-1, 1)
    denoised, noisy = score_digits(x0, y).class_accuracy, score_digits(xt.clamp(-1, 1), y).class_accuracy
    assert denoised >= 0.6 and denoised > noisy + 0.3, (denoised, noisy)


def test_embedded_model_draws_the_requested_digits():
    """Regression guard: uncached DDIM-10 samples are classified as their labels far above chance (10%)."""
    import stepcache

    model = load_embedded()
    cfg = embedded_config()["model"]
    assert cfg["in_channels"] == 1 and cfg["input_size"] == RESOLUTION
    labels = torch.arange(10)
    noise = torch.stack([torch.randn(1, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(k))
                         for k in range(10)])
    images = stepcache.sample(model, noise, labels, num_steps=10, sampler="ddim", cfg_scale=DEFAULT_CFG)
    assert images.shape == (10, 1, RESOLUTION, RESOLUTION)
    scores = score_digits(images, labels)
    assert scores.class_accuracy >= 0.6, scores
