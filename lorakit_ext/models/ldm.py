"""The SD1/SD2 adapter over an ldm ``LatentDiffusion``: A1111's ``shared.sd_model`` or one we loaded.

Conditioning follows kohya sd-scripts, not A1111's prompt parser: captions are plain text (kohya
does not parse ``(word:1.2)`` emphasis when training), every caption is padded to
``max_token_length`` and split into 75-token chunks, each chunk framed by BOS/EOS, encoded, then
joined back into one ``BOS + tokens + EOS`` sequence (227 states for 225 tokens). Fixed shapes per
run also keep the training step capturable.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit_ext.errors import UserError

CHUNK = 75


def clip_text_transformer(clip: nn.Module) -> nn.Module:
    """The module holding CLIP's embeddings, encoder layers and final LayerNorm: ``text_model`` of a
    transformers 4 ``CLIPTextModel``, the model itself in transformers 5 (which dropped that level).
    LoRA paths are relative to it, so kohya names come out the same with either version."""
    return getattr(clip, "text_model", clip)


def _find_clip(cond_stage_model: nn.Module):
    """The HF ``CLIPTextModel`` and tokenizer inside ldm's ``FrozenCLIPEmbedder`` or A1111's wrapper."""
    for holder in (cond_stage_model, getattr(cond_stage_model, "wrapped", None)):
        if holder is not None and hasattr(holder, "transformer") and hasattr(holder, "tokenizer"):
            return holder.transformer, holder.tokenizer
    return None, None


def _find_open_clip(cond_stage_model: nn.Module):
    for holder in (cond_stage_model, getattr(cond_stage_model, "wrapped", None)):
        if holder is not None and hasattr(holder, "encode_with_transformer") and hasattr(holder, "model"):
            return holder
    return None


class LdmModel:
    """Implements :class:`~lorakit_ext.models.base.DiffusionModel` for SD1 and SD2."""

    def __init__(self, sd_model: nn.Module, clip_skip: int = 1, max_token_length: int = 225):
        if hasattr(sd_model, "conditioner"):
            raise UserError("this is an SDXL model; LoRA Kit trains SD1.x and SD2.x models for now")
        if not hasattr(sd_model, "apply_model") or not hasattr(sd_model, "cond_stage_model"):
            raise UserError(
                "the loaded model has no ldm apply_model/cond_stage_model (Forge or another backend?); "
                "in-process training needs A1111's ldm models"
            )
        self.sd_model = sd_model
        self.unet = sd_model.model.diffusion_model
        self.vae = sd_model.first_stage_model
        self.parameterization = getattr(sd_model, "parameterization", "eps")
        self.clip_skip = clip_skip
        self.chunks = max(1, max_token_length // CHUNK)
        clip, tokenizer = _find_clip(sd_model.cond_stage_model)
        if clip is not None:
            self.arch = "sd1"
            self.text_encoder, self._tokenizer = clip, tokenizer
            self.te_root = clip_text_transformer(clip)
        else:
            embedder = _find_open_clip(sd_model.cond_stage_model)
            if embedder is None:
                raise UserError(f"unsupported text encoder {type(sd_model.cond_stage_model).__name__}")
            self.arch = "sd2"
            self.text_encoder, self._embedder = embedder.model, embedder
            self.te_root = embedder.model
            # OpenCLIP's tower is trained on single 77-token windows; SD2 keeps one chunk.
            self.chunks = 1

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ---- images ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        posterior = self.sd_model.encode_first_stage(pixels.to(self.device, dtype))
        return self.sd_model.get_first_stage_encoding(posterior).float()

    # ---- text ---------------------------------------------------------------------------------
    def tokenize(self, captions: list[str]) -> torch.Tensor:
        if self.arch == "sd2":
            import open_clip

            return open_clip.tokenize(captions)[:, None, :]
        length = self.chunks * CHUNK + 2
        ids = self._tokenizer(
            captions, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        ).input_ids
        if self.chunks == 1:
            return ids[:, None, :]
        bos, eos = ids[:, :1], ids[:, -1:]
        return torch.stack([torch.cat([bos, ids[:, i : i + CHUNK], eos], 1) for i in range(1, length - 1, CHUNK)], 1)

    def encode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        batch, chunks, width = ids.shape
        flat = ids.reshape(batch * chunks, width).to(self.device)
        if self.arch == "sd2":
            states = self._embedder.encode_with_transformer(flat)
        elif self.clip_skip > 1:
            out = self.text_encoder(input_ids=flat, output_hidden_states=True)
            states = self.te_root.final_layer_norm(out.hidden_states[-self.clip_skip])
        else:
            states = self.text_encoder(input_ids=flat).last_hidden_state
        states = states.reshape(batch, chunks * width, -1)
        if chunks == 1:
            return states
        # Drop each chunk's own BOS/EOS, keep the first BOS and the last EOS (kohya's layout).
        middle = [states[:, i : i + CHUNK] for i in range(1, chunks * width, width)]
        return torch.cat([states[:, :1], *middle, states[:, -1:]], 1)

    # ---- UNet ---------------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.sd_model.apply_model(noisy, timesteps, cond)
