"""What the trainer needs from a diffusion model, whatever class implements it.

SD1/SD2 (ldm ``LatentDiffusion``) implement it in :mod:`lorakit_ext.models.ldm`. It allows several
text encoders and a conditioning dict, so SDXL (sgm ``DiffusionEngine``: two text encoders, a
pooled vector) can be another implementation without touching the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from lorakit_ext.models.families.base import ModelFamily

# One batch's conditioning, keyed as sgm's conditioner keys it: "crossattn" ``[B, T, C]`` for every
# family; "vector" ``[B, V]`` (pooled text and size embeddings) for a UNet that takes one (SDXL).
Conditioning = dict[str, torch.Tensor]
# What the text encoders give for a batch of captions, before any image enters: "crossattn" for
# every family, "pooled" ``[B, P]`` where the UNet also takes a vector (SDXL). Per caption, so a
# run with frozen encoders can compute it once per caption and keep it.
TextStates = dict[str, torch.Tensor]


class DiffusionModel(Protocol):
    family: "ModelFamily"  # names, metadata and everything else that differs by family
    parameterization: str  # "eps" | "v"
    sd_model: nn.Module  # the user's model object; the only thing restored after training
    unet: nn.Module
    # LoRA component ("te"; SDXL's "te1", "te2") → the module its LoRA paths are relative to.
    text_encoders: dict[str, nn.Module]
    vae: nn.Module  # the image autoencoder: only needed for caching latents
    device: torch.device

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [-1, 1] → scaled latents ``[B,4,H/8,W/8]`` (float32)."""

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Captions → the token ids of every text encoder in one tensor (``[B, chunks, tokens]`` for
        one encoder) on the CPU; host-side, outside the step, whose captured graph has this one
        static input for them."""

    def encode_text(self, ids: torch.Tensor) -> TextStates:
        """Token ids (on any device) → the text encoders' states on the model's device."""

    def condition(self, text: TextStates, sizes: torch.Tensor) -> Conditioning:
        """Text states and each image's size conditioning (``[B, 6]``: original h, w, crop top,
        left, target h, w; see :func:`~lorakit_ext.train.buckets.size_conditioning`) → the UNet's
        conditioning. Families whose UNet takes no sizes ignore them."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → pixels ``[B,3,H,W]`` in about [-1, 1]: for sampling."""

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's output (ε or v) for noisy latents at integer timesteps."""
