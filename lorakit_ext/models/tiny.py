"""Randomly initialised SD1.5 models: a tiny one on disk for tests and demos, a full-size one in
memory for benchmarks. Both keep every SD1.5 module name, so LoRA keys map exactly as on the real model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..fsutil import atomic_write_bytes, atomic_write_text
from .checkpoint import file_layout, place_model
from .clip_tokenizer import build_clip_tokenizer_files
from .families.sd1 import clip_text_transformer
from .ldm_import import build_latent_diffusion
from .sd_configs import TINY_SD15_WIDTHS, sd15_config

TINY_NAME = "tiny-sd15"
_TINY_TEXT_ENCODER = {
    "vocab_size": 49408,
    "hidden_size": TINY_SD15_WIDTHS.context_dim,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": TINY_SD15_WIDTHS.context_dim,
}


def _write_tiny_clip_folder(folder: Path) -> None:
    """CLIP's real tokenizer files and the tiny text model's ``config.json``."""
    from transformers import CLIPTextConfig

    build_clip_tokenizer_files(folder)
    atomic_write_text(folder / "config.json", CLIPTextConfig(**_TINY_TEXT_ENCODER).to_json_string())


def reset_zero_initialised(model: torch.nn.Module) -> None:
    """ldm zero-initialises proj_out, each ResBlock's last conv and the UNet's output conv: a random
    model's prediction would be 0 whatever the prompt or LoRA, and no LoRA would get a gradient."""
    with torch.no_grad():
        for module in model.model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and not module.weight.any():
                module.reset_parameters()


def _make_non_degenerate(model: torch.nn.Module) -> None:
    """Random weights that still behave like a trained model where it matters to training code."""
    reset_zero_initialised(model)
    with torch.no_grad():
        # A fresh LayerNorm has bias 0, so text embeddings average ~0; A1111's emphasis
        # normalisation divides by that mean. Real CLIP's learned bias is far from 0.
        clip_text_transformer(model.cond_stage_model.transformer).final_layer_norm.bias.normal_(mean=0.5, std=0.5)


def fp16_checkpoint(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp16 weights like common SD1.5 files; the top-level noise schedule stays fp32."""
    return file_layout({
        k: (v.half() if v.is_floating_point() and "." in k else v).contiguous()
        for k, v in model.state_dict().items()
    })


def build_tiny_sd15(folder: Path, seed: int = 1234) -> Path:
    """Writes a tiny SD1.5-layout model into ``folder`` and returns the checkpoint's path.

    ``clip/``: CLIP tokenizer + tiny ``CLIPTextModel`` (32 wide, 4 layers); ``tiny-sd15.safetensors``:
    fp16 weights in ldm/A1111 key layout; ``tiny-sd15.yaml``: its config, naming ``clip/``. The same
    seed gives the same checkpoint bytes.
    """
    import safetensors.torch
    from omegaconf import OmegaConf

    folder = Path(folder).resolve()
    clip = folder / "clip"
    _write_tiny_clip_folder(clip)
    config = sd15_config(clip, TINY_SD15_WIDTHS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_latent_diffusion(config)
        _make_non_degenerate(model)
    text_model = model.cond_stage_model.transformer
    text_weights = {k: v.contiguous() for k, v in text_model.state_dict().items()}
    # transformers only reads safetensors files that declare the "pt" format.
    atomic_write_bytes(clip / "model.safetensors", safetensors.torch.save(text_weights, metadata={"format": "pt"}))
    checkpoint = folder / f"{TINY_NAME}.safetensors"
    # One metadata entry only: safetensors does not keep the order of several, and the bytes must repeat.
    metadata = {"lorakit.tiny": f"random SD1.5-layout model, seed {seed}"}
    atomic_write_bytes(checkpoint, safetensors.torch.save(fp16_checkpoint(model), metadata=metadata))
    atomic_write_text(checkpoint.with_suffix(".yaml"), OmegaConf.to_yaml(OmegaConf.create(config)))
    return checkpoint


def build_random_sd15(device: torch.device | str, dtype: torch.dtype, full: bool = True) -> torch.nn.Module:
    """An in-memory SD1.5 ``LatentDiffusion`` with random weights, full-size (CLIP ViT-L/14 text
    encoder, 768 wide, 12 layers) or tiny; nothing is downloaded."""
    with tempfile.TemporaryDirectory(prefix="lorakit-tiny-clip-") as tmp:
        if full:
            config = sd15_config(None)
        else:
            _write_tiny_clip_folder(Path(tmp))
            config = sd15_config(tmp, TINY_SD15_WIDTHS)
        # ldm computes its noise schedule through numpy, so it cannot be built with a GPU as the
        # default device; build it bare on the CPU and draw the weights on ``device``, where a full
        # UNet's random init takes a fraction of the CPU's time.
        model = build_latent_diffusion(config, init_weights=False)
    place_model(model, device, dtype)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    _make_non_degenerate(model)
    return model
