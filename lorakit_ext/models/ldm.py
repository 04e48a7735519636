"""The adapter over an ldm ``LatentDiffusion`` (SD1, SD2): A1111's ``shared.sd_model`` or one we loaded.

Its family (:mod:`lorakit_ext.models.families`) supplies the text encoder and how it conditions;
what every ldm model does alike, VAE latents and the UNet through ``apply_model``, is here.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit_ext.models.base import Conditioning, TextStates
from lorakit_ext.models.families import family_of_model
from lorakit_ext.models.families.stable_diffusion import LdmFamily


class LdmModel:
    """Implements :class:`~lorakit_ext.models.base.DiffusionModel` for the ldm families.

    ``family`` None: found from ``sd_model`` (``LdmFamily.adapter`` passes its own).
    """

    def __init__(self, sd_model: nn.Module, clip_skip: int = 1, max_token_length: int = 225, family: LdmFamily | None = None):
        self.family = family or family_of_model(sd_model)
        self.sd_model = sd_model
        self.unet = sd_model.model.diffusion_model
        self.vae = sd_model.first_stage_model
        # Where the model computes: the UNet's device now, kept while a run parks modules on the CPU.
        self.device = next(self.unet.parameters()).device
        self.parameterization = getattr(sd_model, "parameterization", "eps")
        self.clip_skip = clip_skip
        embedder = self.family.find_embedder(sd_model.cond_stage_model)
        self._text = self.family.text_encoder(embedder, clip_skip, max_token_length)
        self.text_encoders = {"te": self._text.root}

    # ---- images ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        posterior = self.sd_model.encode_first_stage(pixels.to(self.device, dtype))
        return self.sd_model.get_first_stage_encoding(posterior).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        return self.sd_model.decode_first_stage(latents.to(self.device, dtype)).float()

    # ---- text ---------------------------------------------------------------------------------
    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self._text.tokenize(captions)

    def encode_text(self, ids: torch.Tensor) -> TextStates:
        return {"crossattn": self._text.encode(ids.to(self.device))}

    def condition(self, text: TextStates, sizes: torch.Tensor) -> Conditioning:
        # ldm's UNet takes cross-attention only: no pooled vector, no sizes.
        return {"crossattn": text["crossattn"]}

    # ---- UNet ---------------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.sd_model.apply_model(noisy, timesteps, cond["crossattn"])
