"""Native DiT <-> diffusers DiTTransformer2DModel: same weights, same outputs, and the two traps measured."""

from __future__ import annotations

import pytest
import torch

from helpers import randomize, tiny_dit
from stepcache.errors import ConfigError, ModelMismatchError
from stepcache.models.convert import (diffusers_to_dit, dit_to_diffusers, frequency_shifts, native_to_diffusers_state,
                                      set_frequency_shift)

pytest.importorskip("diffusers")

# Float tolerance, relative to the output scale: diffusers runs q, k, v as three matmuls where the native
# model runs one fused qkv matmul; a BLAS may accumulate them in another order (measured here: bit-identical).
RTOL = 1e-5


def _inputs(model, n=6, seed=1):
    """Latents, timesteps spread over 0..999 and labels including the null (CFG) label."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.tensor([0, 1, 37, 250, 640, 999])[:n]
    y = torch.tensor([0, 1, 2, 3, c.num_classes - 1, c.num_classes])[:n]
    return x, t, y


def _max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_native_to_diffusers_same_outputs(learn_sigma):
    model = tiny_dit(depth=3, learn_sigma=learn_sigma)
    tr = dit_to_diffusers(model).eval()
    x, t, y = _inputs(model)
    with torch.no_grad():
        want, got = model(x, t, y), tr(x, t, y).sample
    assert got.shape == want.shape
    assert want.abs().max() > 0.1  # re-randomised adaLN/final layers: a non-trivial output
    assert _max_rel(got, want) <= RTOL
    assert frequency_shifts(tr) == [0.0] * 3


def test_frequency_shift_trap_is_real_and_fixed():
    """diffusers' default downscale_freq_shift=1 changes every output; the converter sets 0 everywhere."""
    model = tiny_dit(depth=2)
    tr = dit_to_diffusers(model).eval()
    x, t, y = _inputs(model)
    with torch.no_grad():
        want = model(x, t, y)
        ok = tr(x, t, y).sample
        set_frequency_shift(tr, 1.0)
        trapped = tr(x, t, y).sample
    assert _max_rel(ok, want) <= RTOL
    assert _max_rel(trapped, want) > 100 * RTOL
    # t = 0 has no frequency dependence: the trap only bites at t > 0
    assert _max_rel(trapped[:1], want[:1]) <= RTOL


def test_round_trip_is_exact():
    model = tiny_dit(depth=3)
    back = diffusers_to_dit(dit_to_diffusers(model))
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert back.config == model.config


def test_diffusers_to_native_same_outputs():
    """A diffusers model built by diffusers itself (randomised, shared embedder, DiT's eps and shift)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    tr = randomize(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                         num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                         norm_eps=1e-6)).eval()
    emb0 = tr.transformer_blocks[0].norm1.emb
    tr.transformer_blocks[1].norm1.emb.load_state_dict(emb0.state_dict())
    set_frequency_shift(tr, 0)
    model = diffusers_to_dit(tr).eval()
    x, t, y = _inputs(model)
    with torch.no_grad():
        assert _max_rel(model(x, t, y), tr(x, t, y).sample) <= RTOL


def test_inexact_sources_refused_unless_asked():
    from diffusers import DiTTransformer2DModel

    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=1,
                               sample_size=8, num_embeds_ada_norm=10)  # diffusers defaults: shift 1, eps 1e-5
    with pytest.raises(ModelMismatchError, match="set_frequency_shift"):
        diffusers_to_dit(tr)
    model = diffusers_to_dit(tr, exact=False)
    assert model.config.depth == 1 and model.config.learn_sigma is False


def test_per_block_embedders_must_agree():
    model = tiny_dit(depth=2)
    tr = dit_to_diffusers(model)
    with torch.no_grad():
        tr.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    with pytest.raises(ModelMismatchError, match="Block 1"):
        diffusers_to_dit(tr)


def test_model_without_null_label_gets_a_zero_row():
    model = tiny_dit(depth=2, class_dropout_prob=0.0)
    tr = dit_to_diffusers(model).eval()
    table = tr.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert table.shape[0] == model.num_classes + 1 and not table[-1].any()
    x, t, y = _inputs(model, n=4)
    with torch.no_grad():
        assert _max_rel(tr(x, t, y).sample, model(x, t, y)) <= RTOL


def test_mlp_ratio_other_than_four_is_refused():
    with pytest.raises(ConfigError, match="MLP ratio"):
        dit_to_diffusers(tiny_dit(depth=1, mlp_ratio=2.0))


def test_state_dict_mapping_covers_every_diffusers_tensor():
    from diffusers import DiTTransformer2DModel

    from stepcache.models.convert import diffusers_config

    model = tiny_dit(depth=2)
    state = native_to_diffusers_state(model.state_dict(), 2, model.num_classes)
    assert state.keys() == DiTTransformer2DModel(**diffusers_config(model)).state_dict().keys()


def test_cli_convert_round_trip_through_folders(tmp_path, capsys):
    """`stepcache convert --to diffusers` then `--to native`: the same weights; the diffusers model, reloaded
    with its frequency shift set to 0, computes what the native one computes."""
    from diffusers import DiTTransformer2DModel

    from stepcache.cli.main import main
    from stepcache.models.checkpoints import save_dit
    from stepcache.models.dit import DiT

    model = tiny_dit(depth=2)
    save_dit(model, tmp_path / "native.safetensors")
    assert main(["convert", "--to", "diffusers", "--from", str(tmp_path / "native.safetensors"),
                 "--out", str(tmp_path / "hf")]) == 0
    assert "set_frequency_shift(model, 0)" in capsys.readouterr().out
    tr = set_frequency_shift(DiTTransformer2DModel.from_pretrained(str(tmp_path / "hf")), 0).eval()
    x, t, y = _inputs(model)
    with torch.no_grad():
        assert _max_rel(tr(x, t, y).sample, model(x, t, y)) <= RTOL
    assert main(["convert", "--to", "native", "--from", str(tmp_path / "hf"), "--out",
                 str(tmp_path / "back.safetensors")]) == 0
    assert "frequency shift 1" in capsys.readouterr().out  # diffusers' own shift, named
    back = DiT.from_pretrained(str(tmp_path / "back.safetensors"))
    a, b = model.state_dict(), back.state_dict()
    assert back.config == model.config and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["convert", "--to", "native", "--from", str(tmp_path / "none"), "--out",
                 str(tmp_path / "x.pt")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["convert", "--to", "native", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "x.bin")]) == 2
    assert "must end in .safetensors or .pt" in capsys.readouterr().err
