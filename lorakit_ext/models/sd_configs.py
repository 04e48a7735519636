"""Model configs for ldm's ``LatentDiffusion`` (the SD1.5 and SD2 layouts) and sgm's
``DiffusionEngine`` (SDXL base), at full or tiny widths.

Equivalent to ldm's ``v1-inference.yaml``, ``v2-inference.yaml``, ``v2-inference-v.yaml`` and sgm's
``sd_xl_base.yaml`` for building a model (the training-only keys are left out). Only widths ever change, never depths or
layer kinds, so every module keeps its SD name and LoRA key mapping works the same on a tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The SD text encoder ids ldm's configs name; they only say "CLIP ViT-L/14" and "OpenCLIP ViT-H/14".
SD1_TEXT_ENCODER_ID = "openai/clip-vit-large-patch14"
SD2_TEXT_ARCH = "ViT-H-14"


@dataclass(frozen=True)
class Widths:
    model_channels: int
    context_dim: int
    vae_channels: int
    # SD1 fixes the number of attention heads, SD2 the width of one head; the other stays -1.
    num_heads: int = -1
    num_head_channels: int = -1


SD15_WIDTHS = Widths(model_channels=320, context_dim=768, vae_channels=128, num_heads=8)
SD2_WIDTHS = Widths(model_channels=320, context_dim=1024, vae_channels=128, num_head_channels=64)
# Head widths 8/16/32 at the three UNet levels: multiples of 8, which fused SDPA kernels need.
TINY_SD15_WIDTHS = Widths(model_channels=32, context_dim=32, vae_channels=32, num_heads=4)


def _unet(widths: Widths, *, linear_proj: bool) -> dict:
    return {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {
            # ldm's own gradient checkpointing is off (A1111 turns it off too): the trainer decides.
            "use_checkpoint": False,
            "use_fp16": False,
            "image_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": widths.model_channels,
            "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 4, 4],
            "num_heads": widths.num_heads,
            "num_head_channels": widths.num_head_channels,
            "use_spatial_transformer": True,
            # SD1's proj_in/proj_out are 1x1 convs, SD2's are Linear: a different LoRA key shape.
            "use_linear_in_transformer": linear_proj,
            "transformer_depth": 1,
            "context_dim": widths.context_dim,
            "legacy": False,
        },
    }


def _vae(widths: Widths) -> dict:
    return {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {
            "embed_dim": 4,
            "monitor": "val/rec_loss",
            "ddconfig": {
                "double_z": True,
                "z_channels": 4,
                "resolution": 256,
                "in_channels": 3,
                "out_ch": 3,
                "ch": widths.vae_channels,
                "ch_mult": [1, 2, 4, 4],
                "num_res_blocks": 2,
                "attn_resolutions": [],
                "dropout": 0.0,
            },
            "lossconfig": {"target": "torch.nn.Identity"},
        },
    }


def _latent_diffusion(unet: dict, vae: dict, text_encoder: dict, *, v: bool) -> dict:
    params = {
        "linear_start": 0.00085,
        "linear_end": 0.0120,
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": 1000,
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": 64,
        "channels": 4,
        "cond_stage_trainable": False,
        "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema",
        "scale_factor": 0.18215,
        "use_ema": False,
        "unet_config": unet,
        "first_stage_config": vae,
        "cond_stage_config": text_encoder,
    }
    if v:
        params["parameterization"] = "v"
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def sd15_config(clip_folder: Path | str | None, widths: Widths = SD15_WIDTHS) -> dict:
    """SD1.x. ``clip_folder`` holds the CLIP tokenizer files and the text model's ``config.json``;
    ``None`` names the usual hub id, which the checkpoint loader replaces with an offline folder."""
    version = SD1_TEXT_ENCODER_ID if clip_folder is None else str(clip_folder)
    text_encoder = {
        "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
        "params": {"version": version},
    }
    return _latent_diffusion(_unet(widths, linear_proj=False), _vae(widths), text_encoder, v=False)


def sd2_config(v: bool, widths: Widths = SD2_WIDTHS, text_arch: str = SD2_TEXT_ARCH) -> dict:
    """SD2.x: 512 px ε-prediction (``v=False``) or 768 px v-prediction (``v=True``).

    ``version`` None: open_clip builds the text tower without downloading pretrained weights,
    which come from the checkpoint anyway.
    """
    text_encoder = {
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": {"arch": text_arch, "version": None, "freeze": True, "layer": "penultimate"},
    }
    return _latent_diffusion(_unet(widths, linear_proj=True), _vae(widths), text_encoder, v=v)


def clip_l_text_config_dict() -> dict:
    """``CLIPTextConfig`` fields of SD1's text encoder (the text tower of CLIP ViT-L/14)."""
    return {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "projection_dim": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "pad_token_id": 1,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    }


# ---- SDXL -------------------------------------------------------------------------------------
SDXL_BIG_G_ARCH = "ViT-bigG-14"
_SGM = "sgm.modules.diffusionmodules."


@dataclass(frozen=True)
class SdxlWidths:
    model_channels: int = 320
    num_head_channels: int = 64
    clip_l_width: int = 768  # CLIP-L's hidden size
    big_g_width: int = 1280  # bigG's hidden size, and its pooled output's
    vae_channels: int = 128

    @property
    def vector(self) -> int:
        # Pooled bigG plus three (h, w) pairs of 256-wide size embeddings: 2816 for SDXL base.
        return self.big_g_width + 6 * 256


SDXL_WIDTHS = SdxlWidths()


def _size_embedder(key: str) -> dict:
    return {"is_trainable": False, "input_key": key, "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": 256}}


def sdxl_config(v: bool, clip_l_folder: Path | str, big_g_arch: str = SDXL_BIG_G_ARCH, widths: SdxlWidths = SDXL_WIDTHS) -> dict:
    """SDXL base (and its fine-tunes: Pony, Illustrious, NoobAI, Animagine), ε- or v-prediction.
    ``clip_l_folder`` holds CLIP-L's tokenizer files and ``config.json``; ``big_g_arch`` is the
    open_clip architecture of the second text encoder, built without pretrained weights."""
    scaling = "VScaling" if v else "EpsScaling"
    unet = {
        "adm_in_channels": widths.vector,
        "num_classes": "sequential",
        "use_checkpoint": False,  # the trainer decides
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": widths.model_channels,
        "attention_resolutions": [4, 2],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 4],
        "num_head_channels": widths.num_head_channels,
        "use_spatial_transformer": True,
        "use_linear_in_transformer": True,
        "transformer_depth": [1, 2, 10],
        "context_dim": widths.clip_l_width + widths.big_g_width,
        "spatial_transformer_attn_type": "softmax",
        "legacy": False,
    }
    embedders = [
        {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
         "params": {"version": str(clip_l_folder), "device": "cpu", "layer": "hidden", "layer_idx": 11}},
        {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
         "params": {"arch": big_g_arch, "version": None, "device": "cpu", "freeze": True, "layer": "penultimate",
                    "always_return_pooled": True, "legacy": False}},
        _size_embedder("original_size_as_tuple"),
        _size_embedder("crop_coords_top_left"),
        _size_embedder("target_size_as_tuple"),
    ]
    vae = {
        "embed_dim": 4,
        "monitor": "val/rec_loss",
        "ddconfig": {
            "attn_type": "vanilla", "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
            "ch": widths.vae_channels, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
        },
        "lossconfig": {"target": "torch.nn.Identity"},
    }
    params = {
        "scale_factor": 0.13025,
        "disable_first_stage_autocast": True,
        "denoiser_config": {
            "target": _SGM + "denoiser.DiscreteDenoiser",
            "params": {
                "num_idx": 1000,
                "weighting_config": {"target": _SGM + "denoiser_weighting.EpsWeighting"},
                "scaling_config": {"target": _SGM + "denoiser_scaling." + scaling},
                "discretization_config": {"target": _SGM + "discretizer.LegacyDDPMDiscretization"},
            },
        },
        "network_config": {"target": _SGM + "openaimodel.UNetModel", "params": unet},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": embedders}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": vae},
    }
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}}
