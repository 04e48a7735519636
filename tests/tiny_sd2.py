"""A tiny SD2-layout model for tests: ldm's SD2 config (Linear proj_in/out, OpenCLIP text tower) at
tiny widths, random weights, written with its .yaml beside it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save

from lorakit_ext.fsutil import atomic_write_bytes, atomic_write_text
from lorakit_ext.models.ldm_import import build_latent_diffusion, import_ldm
from lorakit_ext.models.sd_configs import Widths, sd2_config
from lorakit_ext.models.tiny import reset_zero_initialised

TINY_OPENCLIP = "lorakit-test-tiny-openclip"
TINY_SD2_WIDTHS = Widths(model_channels=32, context_dim=32, vae_channels=32, num_head_channels=8)


def tiny_sd2_config(v: bool) -> dict:
    return sd2_config(v, TINY_SD2_WIDTHS, TINY_OPENCLIP)


def build_tiny_sd2(folder: Path, v: bool = True, trainable: bool = False) -> Path:
    """Writes ``tiny-sd2.safetensors`` and ``tiny-sd2.yaml`` (OpenCLIP text tower 32 wide, 2 layers)
    into ``folder``; returns the checkpoint's path. Registers the tiny OpenCLIP config with open_clip,
    which the yaml names. ``trainable``: no zero-initialised layers, so LoRAs get gradients."""
    from omegaconf import OmegaConf

    import_ldm()  # makes torchvision, which open_clip imports, importable on this machine
    import open_clip

    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}
    vision_cfg = {"image_size": 32, "layers": 1, "width": 32, "head_width": 8, "patch_size": 16}
    atomic_write_text(
        folder / f"{TINY_OPENCLIP}.json", json.dumps({"embed_dim": 32, "vision_cfg": vision_cfg, "text_cfg": text_cfg})
    )
    open_clip.add_model_config(folder / f"{TINY_OPENCLIP}.json")
    config = tiny_sd2_config(v)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_latent_diffusion(config)
        if trainable:
            reset_zero_initialised(model)
    path = folder / "tiny-sd2.safetensors"
    atomic_write_bytes(path, save({k: t.contiguous() for k, t in model.state_dict().items()}))
    atomic_write_text(path.with_suffix(".yaml"), OmegaConf.to_yaml(OmegaConf.create(config)))
    return path
