"""STDiT3 weights and text: the official checkpoint (hpcai-tech/OpenSora-STDiT-v3) and an optional T5 encoder.

The checkpoint is the module state dict of :class:`stepcache.models.stdit3.STDiT3` (``model.safetensors`` on the
Hugging Face hub, or a local .safetensors/.pt file); files without ``rope.freqs`` load too. Text comes in as
precomputed T5-XXL features; :func:`encode_prompts` computes them with ``transformers`` when it and the
DeepFloyd/t5-v1_1-xxl weights are available, and says so in one sentence when they are not.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from stepcache.errors import CheckpointError, ConfigError
from stepcache.models.checkpoints import read_state_dict
from stepcache.models.stdit3 import STDiT3

OFFICIAL_REPO = "hpcai-tech/OpenSora-STDiT-v3"
T5_NAME = "DeepFloyd/t5-v1_1-xxl"
AESTHETIC_SUFFIX = " aesthetic score: 6.5."  # OpenSora v1.2's inference script appends it to every prompt


def load_stdit3(name_or_path: str | os.PathLike = OFFICIAL_REPO, preset: str = "STDiT3-XL/2",
                **overrides) -> STDiT3:
    """An STDiT3 preset with the weights of a local file or of a hub repository (downloaded when online)."""
    path = Path(name_or_path)
    if not path.exists():
        if "/" not in str(name_or_path) or path.suffix:
            raise CheckpointError(f"No checkpoint file at {str(name_or_path)!r}.")
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(name_or_path), "model.safetensors"))
        except Exception as err:  # offline, no such repository, or no huggingface_hub
            raise CheckpointError(f"Could not fetch {name_or_path}/model.safetensors ({type(err).__name__}); "
                                  "pass a local checkpoint file.") from None
    state = read_state_dict(path)
    model = STDiT3.from_preset(preset, **overrides)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise CheckpointError(f"{path} does not match {preset}: {first}") from None
    return model.eval()


def encode_prompts(prompts: list[str], name: str = T5_NAME, max_length: int = 300, device="cpu",
                   aesthetic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 features (n, 1, max_length, 4096) and mask (n, max_length), padded to ``max_length`` as OpenSora."""
    if not prompts:
        raise ConfigError("encode_prompts needs at least one prompt.")
    try:
        from transformers import AutoTokenizer, T5EncoderModel
    except ImportError:
        raise ConfigError("T5 text encoding needs the transformers package; pass precomputed T5 features "
                          "instead.") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        encoder = T5EncoderModel.from_pretrained(name).to(device).eval()
    except Exception as err:  # offline or missing weights
        raise CheckpointError(f"Could not load the T5 encoder {name!r} ({type(err).__name__}); pass precomputed "
                              "T5 features instead.") from None
    texts = [p + AESTHETIC_SUFFIX if aesthetic else p for p in prompts]
    tokens = tokenizer(texts, max_length=max_length, padding="max_length", truncation=True,
                       add_special_tokens=True, return_tensors="pt").to(device)
    with torch.no_grad():
        features = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return features[:, None], tokens.attention_mask
