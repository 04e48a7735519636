"""SD1.x: ldm's ``LatentDiffusion`` with OpenAI's CLIP ViT-L/14 as transformers' ``CLIPTextModel``."""

from __future__ import annotations

import torch
from torch import nn

from lorakit_ext.errors import UserError
from lorakit_ext.models.families.names import hf_clip_name, hf_clip_path
from lorakit_ext.models.families.stable_diffusion import LdmFamily
from lorakit_ext.models.family_presets import SD1_SETTINGS
from lorakit_ext.models.sd_configs import SD15_WIDTHS, sd15_config

CHUNK = 75


def clip_text_transformer(clip: nn.Module) -> nn.Module:
    """The module holding CLIP's embeddings, encoder layers and final LayerNorm: ``text_model`` of a
    transformers 4 ``CLIPTextModel``, the model itself in transformers 5 (which dropped that level).
    LoRA paths are relative to it, so kohya names come out the same with either version."""
    return getattr(clip, "text_model", clip)


class ClipText:
    """SD1's text encoder as kohya sd-scripts conditions on it, not as A1111's prompt parser does:
    captions are plain text (kohya does not parse ``(word:1.2)`` emphasis when training), every
    caption is padded to ``max_token_length`` and split into 75-token chunks, each chunk framed by
    BOS/EOS, encoded, then joined back into one ``BOS + tokens + EOS`` sequence (227 states for 225
    tokens). Fixed shapes per run also keep the training step capturable."""

    def __init__(self, clip: nn.Module, tokenizer, root: nn.Module, clip_skip: int, max_token_length: int):
        depth = len(root.encoder.layers)
        # clip_skip N conditions on the N-th layer from the end; past the first layer there are
        # only the bare embeddings, then an IndexError at the first step, long after the setup.
        if not 1 <= clip_skip <= depth:
            raise UserError(
                f"clip_skip {clip_skip} does not fit this model's text encoder, which has {depth} layers; "
                f"use a clip_skip from 1 to {depth} (1: its last layer, 2: the one before, …)"
            )
        self.clip, self.tokenizer, self.root = clip, tokenizer, root
        self.clip_skip = clip_skip
        self.chunks = max(1, max_token_length // CHUNK)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return chunked_ids(self.tokenizer, captions, self.chunks)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        batch, chunks, width = ids.shape
        flat = ids.reshape(batch * chunks, width)
        if self.clip_skip > 1:
            out = self.clip(input_ids=flat, output_hidden_states=True)
            states = self.root.final_layer_norm(out.hidden_states[-self.clip_skip])
        else:
            states = self.clip(input_ids=flat).last_hidden_state
        return joined_chunks(states, batch)


def chunked_ids(tokenizer, captions: list[str], chunks: int) -> torch.Tensor:
    """Token ids ``[B, chunks, 77]``: each caption padded to ``chunks × 75`` tokens and cut into
    75-token chunks, each framed by BOS and EOS, as kohya sd-scripts feeds CLIP long captions."""
    length = chunks * CHUNK + 2
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=length, return_tensors="pt").input_ids
    if chunks == 1:
        return ids[:, None, :]
    bos, eos = ids[:, :1], ids[:, -1:]
    return torch.stack([torch.cat([bos, ids[:, i : i + CHUNK], eos], 1) for i in range(1, length - 1, CHUNK)], 1)


def joined_chunks(states: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-chunk states ``[B × chunks, 77, C]`` → one sequence ``[B, chunks × 75 + 2, C]``: each
    chunk's own BOS/EOS dropped, the first BOS and the last EOS kept (kohya's layout)."""
    width = states.shape[1]
    states = states.reshape(batch, -1, states.shape[-1])
    if states.shape[1] == width:
        return states
    middle = [states[:, i : i + CHUNK] for i in range(1, states.shape[1], width)]
    return torch.cat([states[:, :1], *middle, states[:, -1:]], 1)


class Sd1Family(LdmFamily):
    name = "sd1"
    label = SD1_SETTINGS.label
    sd_version = "SD1"
    base_model_version = "sd_v1"
    v2 = False
    widths = SD15_WIDTHS
    text_key = "cond_stage_model.transformer.text_model."
    text_width_key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    embedder_attributes = ("transformer", "tokenizer")  # ldm's FrozenCLIPEmbedder
    presets = SD1_SETTINGS.presets

    def model_config(self, state_dict) -> dict:
        # As A1111: an SD1 v-prediction model comes with its .yaml.
        return sd15_config(None)

    def architecture(self, v: bool) -> str:
        # sai_model_spec names no v-prediction variant of SD1.
        return "stable-diffusion-v1/lora"

    def text_root(self, embedder: nn.Module) -> nn.Module:
        return clip_text_transformer(embedder.transformer)

    def text_encoder(self, embedder: nn.Module, clip_skip: int, max_token_length: int) -> ClipText:
        return ClipText(embedder.transformer, embedder.tokenizer, self.text_root(embedder), clip_skip, max_token_length)

    def _te_name(self, module_path: str) -> str:
        return hf_clip_name(module_path)

    def _te_path(self, name: str) -> str:
        return hf_clip_path(name)

SD1 = Sd1Family()
