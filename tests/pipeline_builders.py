"""Tiny diffusers pipelines that run from a folder, offline, with prompts: what ``stepcache generate`` and
``stepcache tune --pipeline`` load.

The transformers and schedulers are test_diffusers.py's tiny families (re-randomised, so caching changes
the output); this module adds what a prompt needs (a word-level tokenizer and tiny random text encoders)
and a one-level VAE, so the pipelines decode images like the real ones. ``save_tiny(name, folder)``
writes one with ``save_pretrained``.
"""

from __future__ import annotations

import torch

WORDS = ["a", "an", "the", "cat", "dog", "red", "blue", "car", "house", "tree", "photo", "of", "on", "in"]


def tokenizer(max_length: int):
    """A word-level fast tokenizer (no downloads): unknown words map to [UNK]; eos closes every prompt."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                                   model_max_length=max_length)


def t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(1)
    cfg = T5Config(vocab_size=32, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)
    return T5EncoderModel(cfg).eval()


def clip(hidden: int, projection: int | None = None, seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=32, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=2,
                         eos_token_id=2, projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)).eval()


def vae(latent_channels: int):
    """One level (no downsampling): the latent side equals the image side."""
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=latent_channels, norm_num_groups=4,
                         layers_per_block=1, shift_factor=0.0).eval()


def build(name: str, output_gain: float = 1.0):
    """The tiny pipeline of family ``name`` (dit, pixart, sd3, flux) with encoders, tokenizers and VAE.

    ``output_gain`` scales the transformer's last projection: at 1 the random model's prediction is so
    small next to the noise that a cache's error hardly reaches the decoded image (FORA(2) at 130+ dB);
    at 30 the tiny DiT's FORA(2) and FORA(4) decode at about 88 and 70 dB, a difference a tuner can rank.
    """
    import test_diffusers as td

    base = {"dit": td.build_dit, "pixart": td.build_pixart, "sd3": td.build_sd3, "flux": td.build_flux}[name]()
    last = base.transformer.proj_out_2 if hasattr(base.transformer, "proj_out_2") else base.transformer.proj_out
    with torch.no_grad():
        last.weight.mul_(output_gain)
        last.bias.mul_(output_gain)
    if name == "dit":  # with ImageNet-style names for a few classes, as the hub's DiT pipelines have
        labels = {3: "tabby cat, tabby", 7: "cock", 207: "golden retriever"}
        pipe = type(base)(transformer=base.transformer, vae=base.vae, scheduler=base.scheduler, id2label=labels)
        pipe.register_to_config(id2label=labels)  # saved in model_index.json
        return pipe
    cls, tr, sched = type(base), base.transformer, base.scheduler
    if name == "pixart":
        return cls(tokenizer=tokenizer(16), text_encoder=t5(32), vae=vae(4), transformer=tr, scheduler=sched)
    if name == "sd3":  # CLIP-L 8 + CLIP-G 8 = 16 wide, padded to the T5 width 32; pooled 16 + 16 = 32
        return cls(transformer=tr, scheduler=sched, vae=vae(4), text_encoder=clip(8, 16), tokenizer=tokenizer(16),
                   text_encoder_2=clip(8, 16, seed=4), tokenizer_2=tokenizer(16), text_encoder_3=t5(32),
                   tokenizer_3=tokenizer(16))
    return cls(scheduler=sched, vae=vae(4), text_encoder=clip(32), tokenizer=tokenizer(16), text_encoder_2=t5(32),
               tokenizer_2=tokenizer(16), transformer=tr)


def save_tiny(name: str, folder, output_gain: float = 1.0) -> str:
    pipe = build(name, output_gain)
    pipe.save_pretrained(str(folder))
    return str(folder)
