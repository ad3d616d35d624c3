"""STDiT3 (OpenSora v1.2) and the rectified-flow sampler: shapes, checkpoint keys, sampler invariants."""

from __future__ import annotations

import math

import pytest
import torch

import stepcache
from stepcache.errors import ConfigError
from stepcache.models.stdit3 import STDiT3, pos_embed_2d
from stepcache.sampling.rflow import timesteps
from tests.stdit3_helpers import tiny_stdit3, video_inputs

SIZES = dict(height=240.0, width=426.0, num_frames=51.0, fps=24.0)


def model_kwargs(n: int) -> dict:
    return {k: torch.tensor([v] * n) for k, v in SIZES.items() if k != "num_frames"}


def test_xl_preset_has_the_official_checkpoint_keys_and_shapes():
    with torch.device("meta"):
        model = STDiT3.from_preset("STDiT3-XL/2")
    sd = model.state_dict()
    want = {
        "x_embedder.proj.weight": (1152, 4, 1, 2, 2), "t_embedder.mlp.0.weight": (1152, 256),
        "fps_embedder.mlp.2.weight": (1152, 1152), "t_block.1.weight": (6912, 1152),
        "y_embedder.y_embedding": (300, 4096), "y_embedder.y_proj.fc1.weight": (1152, 4096),
        "y_embedder.y_proj.fc2.weight": (1152, 1152), "rope.freqs": (36,),
        "spatial_blocks.0.scale_shift_table": (6, 1152), "temporal_blocks.27.attn.qkv.weight": (3456, 1152),
        "temporal_blocks.3.attn.q_norm.weight": (72,), "spatial_blocks.5.attn.k_norm.weight": (72,),
        "spatial_blocks.0.attn.proj.weight": (1152, 1152), "temporal_blocks.0.cross_attn.q_linear.weight": (1152, 1152),
        "spatial_blocks.9.cross_attn.kv_linear.weight": (2304, 1152), "temporal_blocks.1.cross_attn.proj.bias": (1152,),
        "spatial_blocks.27.mlp.fc1.weight": (4608, 1152), "spatial_blocks.27.mlp.fc2.weight": (1152, 4608),
        "final_layer.scale_shift_table": (2, 1152), "final_layer.linear.weight": (32, 1152),
    }
    for key, shape in want.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any("pos_embed" in k or "cached" in k for k in sd)
    per_block = 17  # table, qkv, q/k norm, proj, q_linear, kv_linear, proj, fc1, fc2 (weights and biases)
    assert sum(k.startswith(("spatial_blocks.", "temporal_blocks.")) for k in sd) == 56 * per_block
    params = sum(p.numel() for p in model.parameters())
    assert 1.20e9 < params < 1.23e9  # about 1.21e9


def test_state_dict_round_trip_with_and_without_rope_freqs():
    a, b = tiny_stdit3(0), tiny_stdit3(1)
    sd = {k: v for k, v in a.state_dict().items() if k != "rope.freqs"}
    b.load_state_dict(sd)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(RuntimeError):
        b.load_state_dict({**sd, "unexpected.weight": torch.zeros(1)})


def test_forward_shapes_with_padding_and_fp32_output():
    model = tiny_stdit3(0)
    z, y, mask = video_inputs(model, 2, latent=(4, 3, 5, 7))  # odd H, W: padded to 6 x 8, cropped back
    out = model(z, torch.tensor([999.0, 10.0]), y, mask=mask, **model_kwargs(2))
    assert out.shape == (2, 8, 3, 5, 7) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_batch_rows_are_independent_and_mask_limits_the_text():
    model = tiny_stdit3(0)
    z, y, mask = video_inputs(model, 2)
    t = torch.tensor([500.0, 500.0])
    both = model(z, t, y, mask=mask, **model_kwargs(2))
    first = model(z[:1], t[:1], y[:1], mask=mask[:1], **model_kwargs(1))
    assert torch.allclose(both[:1], first, atol=1e-5)
    y2 = y.clone()
    y2[0, 0, int(mask[0].sum()):] += 5.0  # masked-out text rows change nothing
    assert torch.allclose(model(z, t, y2, mask=mask, **model_kwargs(2)), both, atol=0)


def test_temporal_blocks_see_frame_order_and_spatial_blocks_see_pixels():
    model = tiny_stdit3(0)
    z, y, mask = video_inputs(model, 1)
    t = torch.tensor([700.0])
    out = model(z, t, y, mask=mask, **model_kwargs(1))
    flipped = model(z.flip(2), t, y, mask=mask, **model_kwargs(1)).flip(2)
    assert not torch.allclose(out, flipped, atol=1e-4)  # RoPE: time order matters


def test_pos_embed_column_first_and_scaled():
    table = pos_embed_2d(8, 2, 3, scale=1.0, base_size=2)  # (1, 6, 8)
    # token (row 1, col 2): column coordinate 2 * 2/3 fills the first half, row 1 * 2/2 the second
    c, r = 2 * (2 / 3), 1.0
    assert torch.allclose(table[0, 5, :4], torch.tensor([c, c / 100, c, c / 100]).sin().where(
        torch.tensor([True, True, False, False]), torch.tensor([c, c / 100, c, c / 100]).cos()), atol=1e-6)
    assert torch.allclose(table[0, 5, 4], torch.tensor(r).sin())


def test_bf16_forward_runs_and_tracks_fp32():
    model = tiny_stdit3(0)
    z, y, mask = video_inputs(model, 1)
    t = torch.tensor([400.0])
    ref = model(z, t, y, mask=mask, **model_kwargs(1))
    out = model.to(torch.bfloat16)(z, t, y, mask=mask, **model_kwargs(1))
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() / ref.abs().max() < 0.1


def test_bad_configs_raise_config_error():
    with pytest.raises(ConfigError):
        STDiT3.from_preset("STDiT3-XXL/2")
    with pytest.raises(ConfigError):
        STDiT3(depth=1, hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError):
        STDiT3(depth=1, hidden_size=32, num_heads=2, enable_sequence_parallelism=True)
    with pytest.raises(ConfigError):
        STDiT3(depth=1, hidden_size=32, num_heads=2, no_such_option=1)


# ---------------------------------------------------------------------------------- sampler
def test_timestep_transform_matches_the_spec_at_480p():
    h, w, f = torch.tensor([480.0]), torch.tensor([854.0]), torch.tensor([51.0])
    ts = [float(t) for t in timesteps(30, 1, h, w, f)]
    assert ts[0] == pytest.approx(1000.0)
    assert ts[1:4] == pytest.approx([992.93, 985.47, 977.57], abs=0.006)  # the spec's figures (2 decimals)
    assert ts[-4:] == pytest.approx([426.97, 349.86, 257.02, 143.1], abs=0.011)
    short = [float(t) for t in timesteps(10, 1, h, w, torch.tensor([9.0]))]  # reference quirk: F = 0, r = 0
    assert math.isnan(short[0]) and all(t == 0.0 for t in short[1:])  # 0 / 0 at t = 1000, then 0
    image = timesteps(10, 1, h, w, torch.tensor([1.0]))
    plain = timesteps(10, 1, h, w, f, transform=False)
    assert float(image[5]) != float(plain[5]) and float(plain[5]) == pytest.approx(500.0)


class Recorder(torch.nn.Module):
    """A stand-in video model: velocity a on cond rows and b on uncond rows (channels 0-3), junk elsewhere;
    records what it was called with."""

    in_channels = 4

    def __init__(self, a: float, b: float, length: int = 6, channels: int = 16):
        super().__init__()
        self.y_embedder = torch.nn.Module()
        self.y_embedder.register_buffer("y_embedding", torch.randn(length, channels))
        self.a, self.b, self.calls = a, b, []

    def forward(self, x, t, y, mask=None, fps=None, height=None, width=None):
        self.calls.append(dict(t=t.clone(), y=y.clone(), mask=mask, fps=fps))
        n = x.shape[0] // 2
        v = torch.cat([torch.full_like(x[:n], self.a), torch.full_like(x[n:], self.b)])
        return torch.cat([v, torch.full_like(x, 1e6)], dim=1)


def test_euler_steps_integrate_to_t0_and_cfg_uses_the_null_caption_under_the_cond_mask():
    model = Recorder(a=2.0, b=-1.0)
    n = 2
    z = torch.randn(n, 4, 2, 4, 4)
    y = torch.randn(n, 1, 6, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    out = stepcache.sample(model, z, y, num_steps=7, sampler="rflow", cfg_scale=7.0, mask=mask, **SIZES)
    v = -1.0 + 7.0 * (2.0 - -1.0)
    ts = timesteps(7, n, *(torch.tensor([SIZES[k]] * n) for k in ("height", "width", "num_frames")))
    assert torch.allclose(out, z + v * ts[0][0] / 1000, atol=1e-5)  # the steps sum to t'_0 / 1000 = 1
    assert len(model.calls) == 7
    call = model.calls[0]
    assert torch.equal(call["y"][:n], y)
    assert torch.equal(call["y"][n:], model.y_embedder.y_embedding[None, None].expand(n, 1, 6, 16))
    assert call["mask"] is mask  # the cond mask, also read for the null rows
    assert torch.equal(call["t"], torch.cat([ts[0], ts[0]]))
    assert [float(c["t"][0]) for c in model.calls] == [float(t[0]) for t in ts]


def test_rflow_with_a_real_model_is_deterministic():
    model = tiny_stdit3(0)
    z, y, mask = video_inputs(model, 1)
    kw = dict(num_steps=3, sampler="rflow", cfg_scale=7.0, mask=mask, **SIZES)
    plain = stepcache.sample(model, z, y, **kw)
    assert plain.shape == z.shape and torch.isfinite(plain).all()
    assert torch.equal(plain, stepcache.sample(model, z, y, **kw))
    assert not torch.allclose(plain, stepcache.sample(model, z, y, **{**kw, "cfg_scale": 1.0}), atol=1e-3)


def test_rflow_bad_inputs_raise_config_error():
    model = tiny_stdit3(0)
    z, y, mask = video_inputs(model, 1)
    kw = dict(num_steps=2, sampler="rflow", mask=mask, **SIZES)
    with pytest.raises(ConfigError):
        stepcache.sample(model, z[:, :, 0], y, **kw)  # 4-D noise
    with pytest.raises(ConfigError):
        stepcache.sample(model, z, y[:, :, :3], **kw)  # text shorter than model_max_length
    with pytest.raises(ConfigError):
        stepcache.sample(model, z, y, num_steps=2, sampler="rflow", mask=mask, height=240, width=426)  # no frames
    with pytest.raises(ConfigError):
        stepcache.sample(model, z, y, frames=3, **kw)
    with pytest.raises(ConfigError):
        stepcache.sample(model, z, y, **{**kw, "num_frames": 9})  # the transform's NaN quirk
    with pytest.raises(ConfigError):
        stepcache.sample(model, z, y, **{**kw, "mask": torch.zeros_like(mask)})
    with pytest.raises(ConfigError):
        stepcache.sample(tiny_dit_like(), torch.randn(1, 4, 8, 8), torch.tensor([1]), num_steps=2, sampler="ddim",
                         height=240)


def tiny_dit_like():
    from tests.helpers import tiny_dit

    return tiny_dit(depth=1, hidden=32, heads=2)
