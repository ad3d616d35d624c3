"""Tiny random STDiT3 models and inputs, shared by tests/test_stdit3.py and benchmarks/opensora_parity.py."""

from __future__ import annotations

import torch

from stepcache.models.stdit3 import STDiT3

TINY = dict(depth=2, hidden_size=32, num_heads=2, caption_channels=16, model_max_length=6)


def randomize_stdit3(model: STDiT3, seed: int = 0) -> STDiT3:
    """Fan-in scaled random weights everywhere (the temporal blocks' zero-initialised output projections and the
    fps embedder too, or caching them would change nothing), small random biases, norm weights near 1 and a
    random null caption; ``rope.freqs`` keeps its definition."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "rope.freqs":
                continue
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("scale_shift_table"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        model.y_embedder.y_embedding.copy_(torch.randn(model.y_embedder.y_embedding.shape, generator=g))
    return model.eval()


def tiny_stdit3(seed: int = 0, **overrides) -> STDiT3:
    torch.manual_seed(seed)
    return randomize_stdit3(STDiT3(**{**TINY, **overrides}), seed)


def video_inputs(model: STDiT3, n: int, latent=(4, 3, 4, 6), seed: int = 0, text_len: int = 4):
    """noise (n, C, T, H, W), T5 features (n, 1, L, C_text) and a mask (n, L) of rows of different lengths."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *latent, generator=g)
    y = torch.randn(n, 1, model.model_max_length, model.config["caption_channels"], generator=g)
    mask = torch.zeros(n, model.model_max_length, dtype=torch.long)
    for b in range(n):
        mask[b, : max(1, text_len - b)] = 1
    return z, y, mask
