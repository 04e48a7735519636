"""Counting a caption's CLIP tokens exactly, with the tokenizer of the model A1111 has loaded.

SD1's CLIP-L, SDXL's first encoder and SD2's OpenCLIP all use CLIP's BPE vocabulary, so when the
loaded model exposes no HF tokenizer (SD2, or no model yet) the one built offline from open_clip's
vocabulary gives the same counts. Only with neither is the count an estimate.
"""

from __future__ import annotations

from typing import Callable

from lorakit_ext.dataset.tags import estimate_clip_tokens
from lorakit_ext.models.clip_tokenizer import clip_token_counter, load_clip_tokenizer

_built: list = []  # [tokenizer or None], filled on first use: building it reads a 1.3 MB vocabulary


def loaded_model_tokenizer():
    """The HF tokenizer of the checkpoint in memory, or None. Reads ``model_data.sd_model``:
    ``shared.sd_model`` would load a checkpoint when none is loaded."""
    from modules import sd_models

    model = sd_models.model_data.sd_model
    embedders = getattr(getattr(model, "conditioner", None), "embedders", None)
    encoder = embedders[0] if embedders else getattr(model, "cond_stage_model", None)
    return getattr(getattr(encoder, "wrapped", None), "tokenizer", None)


def token_counter() -> tuple[Callable[[str], int], bool]:
    """``(count, exact)``: the loaded model's tokenizer, else the offline one, else the estimate."""
    tokenizer = loaded_model_tokenizer()
    if tokenizer is None:
        if not _built:
            _built.append(load_clip_tokenizer())
        tokenizer = _built[0]
    if tokenizer is None:
        return estimate_clip_tokens, False
    return clip_token_counter(tokenizer), True
