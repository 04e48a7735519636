"""What the trainer needs from a diffusion model, whatever class implements it.

SD1/SD2 (ldm ``LatentDiffusion``) implement it in :mod:`lorakit_ext.models.ldm`; SDXL (sgm
``DiffusionEngine``) can be added as another implementation without touching the loop.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class DiffusionModel(Protocol):
    arch: str  # "sd1" | "sd2": selects key names and metadata
    parameterization: str  # "eps" | "v"
    sd_model: nn.Module  # the user's model object; the only thing restored after training
    unet: nn.Module
    text_encoder: nn.Module  # the text encoder as called
    te_root: nn.Module  # the module text-encoder LoRA paths are relative to
    vae: nn.Module  # the image autoencoder: only needed for caching latents
    device: torch.device

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [-1, 1] → scaled latents ``[B,4,H/8,W/8]`` (float32)."""

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Captions → token ids ``[B, chunks, tokens]`` on the CPU; host-side, outside the step."""

    def encode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids on the model's device → cross-attention conditioning ``[B, T, C]``."""

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's output (ε or v) for noisy latents at integer timesteps."""
