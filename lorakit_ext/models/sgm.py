"""The adapter over sgm's ``DiffusionEngine`` (SDXL and its fine-tunes): A1111's ``shared.sd_model``
when ``is_sdxl``, or one :mod:`~lorakit_ext.models.checkpoint` loaded.

Conditioning is kohya sd-scripts' ``sdxl_train_network.py``'s, which is SDXL's own:
- cross-attention: CLIP-L's layer-11 states (no final norm) beside bigG's penultimate states, each
  caption in 75-token chunks joined as for SD1 (227 states for 225 tokens);
- vector (2816): bigG's pooled output of the first chunk, then the 256-wide sinusoidal embeddings of
  original height/width, crop top/left and target height/width, per image from its bucket.

The UNet is called directly with integer timesteps, as kohya does (A1111's wrapper would cast
them to half floats), which also keeps the step capturable in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from lorakit_ext.models.base import Conditioning, TextStates
from lorakit_ext.models.families.sd1 import CHUNK, chunked_ids, joined_chunks
from lorakit_ext.models.families.sdxl import SdxlFamily, embedder_part

SIZE_WIDTH = 256  # sgm's ConcatTimestepEmbedderND outdim, per number
_PAD = 0  # bigG's padding token ("!"), where CLIP-L pads with EOS


def parameterization_of(sd_model: nn.Module) -> str:
    """"v" or "eps": A1111 sets ``parameterization`` when it loads SDXL; a model built elsewhere
    says it by its denoiser's scaling (sgm's ``VScaling`` for v-prediction)."""
    known = getattr(sd_model, "parameterization", None)
    if known in ("v", "eps"):
        return known
    scaling = getattr(getattr(sd_model, "denoiser", None), "scaling", None)
    return "v" if type(scaling).__name__ == "VScaling" else "eps"


def open_clip_ids(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """CLIP-L's chunked ids ``[..., 77]`` with bigG's padding: every token after a chunk's first EOS
    is 0, as A1111 pads bigG's prompts and kohya's second tokenizer pads captions."""
    after_eos = (ids == eos).int().cumsum(-1) - (ids == eos).int() > 0
    return ids.masked_fill(after_eos, _PAD)


def size_embedding(sizes: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``[B, 6]`` numbers → ``[B, 6 × 256]``: each number's ``[cos(n·f), sin(n·f)]``, as sgm's
    ``ConcatTimestepEmbedderND`` embeds original size, crop and target size."""
    args = sizes.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], -1).flatten(1)


def size_frequencies(device: torch.device, width: int = SIZE_WIDTH, max_period: float = 10000.0) -> torch.Tensor:
    half = width // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(device)


@contextlib.contextmanager
def full_precision(vae: nn.Module):
    """Runs an fp16 VAE in fp32 for the block: SDXL's VAE overflows to NaN in fp16 (kohya's
    ``--no_half_vae``). fp16 → fp32 → fp16 is exact, so the user's weights come back bit for bit."""
    dtype = next(vae.parameters()).dtype
    if dtype != torch.float16:
        yield
        return
    vae.to(torch.float32)
    try:
        yield
    finally:
        vae.to(dtype)


class BigGText:
    """OpenCLIP bigG as SDXL conditions on it: penultimate states and the pooled, projected EOS
    state of the last layer."""

    def __init__(self, model: nn.Module):
        self.model = model

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        x = m.token_embedding(ids) + m.positional_embedding
        batch_first = getattr(m.transformer, "batch_first", False)
        x = x if batch_first else x.permute(1, 0, 2)
        blocks = m.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x, attn_mask=m.attn_mask)
        penultimate = x
        x = blocks[-1](x, attn_mask=m.attn_mask)
        if not batch_first:
            penultimate, x = penultimate.permute(1, 0, 2), x.permute(1, 0, 2)
        # The EOS token has the highest id: argmax finds each sequence's first one.
        eos = m.ln_final(x)[torch.arange(x.shape[0], device=x.device), ids.argmax(-1)]
        projection = m.text_projection
        pooled = eos @ projection if isinstance(projection, torch.Tensor) else projection(eos)
        return penultimate, pooled


class SgmModel:
    """Implements :class:`~lorakit_ext.models.base.DiffusionModel` for SDXL."""

    def __init__(self, sd_model: nn.Module, family: SdxlFamily, max_token_length: int = 225):
        self.family = family
        self.sd_model = sd_model
        self.unet = sd_model.model.diffusion_model
        self.vae = sd_model.first_stage_model
        # Where the model computes: the UNet's device now, kept while a run parks modules on the CPU.
        self.device = next(self.unet.parameters()).device
        self.parameterization = parameterization_of(sd_model)
        roots = family.component_roots(sd_model)
        self.text_encoders = {"te1": roots["te1"], "te2": roots["te2"]}
        clip_embedder = sd_model.conditioner.embedders[0]
        self._clip = embedder_part(clip_embedder, "transformer", "CLIP-L text encoder (embedder 0)")
        self._tokenizer = embedder_part(clip_embedder, "tokenizer", "CLIP-L tokenizer (embedder 0)")
        # sgm's config says which CLIP-L layer conditions (11 of 12 for SDXL base).
        self._clip_layer = embedder_part(clip_embedder, "layer_idx", "CLIP-L layer choice (embedder 0)")
        self._big_g = BigGText(roots["te2"])
        self.chunks = max(1, max_token_length // CHUNK)
        self._freqs: torch.Tensor | None = None

    # ---- images ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with full_precision(self.vae):
            dtype = next(self.vae.parameters()).dtype
            # sgm's encode_first_stage samples the posterior and applies scale_factor (0.13025).
            return self.sd_model.encode_first_stage(pixels.to(self.device, dtype)).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        with full_precision(self.vae):
            dtype = next(self.vae.parameters()).dtype
            return self.sd_model.decode_first_stage(latents.to(self.device, dtype)).float()

    # ---- text and sizes -----------------------------------------------------------------------
    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """``[B, 2, chunks, 77]``: CLIP-L's ids, then bigG's (the same tokens, padded with 0)."""
        ids = chunked_ids(self._tokenizer, captions, self.chunks)
        return torch.stack([ids, open_clip_ids(ids, self._tokenizer.eos_token_id)], 1)

    def encode_text(self, ids: torch.Tensor) -> TextStates:
        ids = ids.to(self.device)
        batch, _, chunks, width = ids.shape
        clip_ids, big_g_ids = ids[:, 0].reshape(-1, width), ids[:, 1].reshape(-1, width)
        clip_states = self._clip(input_ids=clip_ids, output_hidden_states=True).hidden_states[self._clip_layer]
        big_g_states, pooled = self._big_g.encode(big_g_ids)
        crossattn = torch.cat([joined_chunks(clip_states, batch), joined_chunks(big_g_states, batch).to(clip_states.dtype)], -1)
        # kohya conditions on the first chunk's pooled output.
        return {"crossattn": crossattn, "pooled": pooled.reshape(batch, chunks, -1)[:, 0]}

    def condition(self, text: TextStates, sizes: torch.Tensor) -> Conditioning:
        if self._freqs is None or self._freqs.device != self.device:
            self._freqs = size_frequencies(self.device)
        pooled = text["pooled"]
        vector = torch.cat([pooled, size_embedding(sizes.to(self.device), self._freqs).to(pooled.dtype)], -1)
        return {"crossattn": text["crossattn"], "vector": vector}

    # ---- UNet ---------------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.unet(noisy, timesteps=timesteps, context=cond["crossattn"], y=cond["vector"])
