"""A tiny SDXL-layout model: sgm's (Stability-AI/generative-models) own ``DiffusionEngine``, built by
LoRA Kit's own headless builder from its SDXL config at tiny widths.

sgm is not on PyPI: ``LORAKIT_SGM_DIR`` names a checkout (A1111 keeps one in
``repositories/generative-models``); without it the tests that need the model skip. Every block,
layer and transformer count is SDXL base's, so every module name (and kohya name) is the real
one; only the widths are tiny, as in the a1111 harness's tiny SDXL (UNet 32/64/128, CLIP-L 32
wide, bigG 64 wide: GroupNorm needs multiples of 32).
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

SGM_SKIP = "sgm (Stability-AI/generative-models) not found; set LORAKIT_SGM_DIR"
TINY_OPEN_CLIP = "lorakit-tiny-sdxl-bigG"
_CLIP_L = {"hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 12}
_BIG_G = {"width": 64, "heads": 4, "layers": 32}


def sgm_dir() -> Path:
    """The sgm checkout of ``LORAKIT_SGM_DIR``, importable; skips the calling test without one."""
    folder = Path(os.environ.get("LORAKIT_SGM_DIR", "")).expanduser()
    if not os.environ.get("LORAKIT_SGM_DIR") or not (folder / "sgm" / "__init__.py").is_file():
        pytest.skip(SGM_SKIP)
    # sgm imports kornia at module level for image embedders SDXL does not have; A1111 installs it
    # (and LoRA Kit's [sdxl] extra), the test environment need not.
    try:
        import kornia  # noqa: F401
    except ImportError:
        sys.modules["kornia"] = types.ModuleType("kornia")
    return folder


def write_tiny_text_encoders(folder: Path) -> tuple[Path, str]:
    """CLIP-L's tokenizer and tiny config in ``folder/clip-l``, and a tiny bigG architecture
    registered with open_clip; returns (the CLIP-L folder, the bigG architecture's name)."""
    from transformers import CLIPTextConfig

    from lorakit_ext.models.clip_tokenizer import build_clip_tokenizer_files
    from lorakit_ext.models.ldm_import import import_torchvision

    import_torchvision()  # before open_clip, which imports torchvision
    import open_clip

    clip_l = folder / "clip-l"
    build_clip_tokenizer_files(clip_l)
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", **_CLIP_L)
    (clip_l / "config.json").write_text(config.to_json_string())
    arch = folder / f"{TINY_OPEN_CLIP}.json"
    vision = {"image_size": 28, "layers": 1, "width": 32, "head_width": 16, "patch_size": 14}
    arch.write_text(json.dumps({"embed_dim": 64, "vision_cfg": vision, "text_cfg": {"context_length": 77, "vocab_size": 49408, **_BIG_G}}))
    open_clip.add_model_config(arch)
    return clip_l, TINY_OPEN_CLIP


def tiny_sdxl_config(folder: Path, v: bool = False) -> dict:
    from lorakit_ext.models.sd_configs import SdxlWidths, sdxl_config

    clip_l, big_g = write_tiny_text_encoders(folder)
    widths = SdxlWidths(model_channels=32, num_head_channels=16, clip_l_width=32, big_g_width=64, vae_channels=32)
    return sdxl_config(v, clip_l_folder=clip_l, big_g_arch=big_g, widths=widths)


def build_tiny_sdxl(folder: Path, seed: int = 1234, v: bool = False, config: dict | None = None) -> torch.nn.Module:
    """sgm's ``DiffusionEngine`` at tiny widths with random weights, in fp32 on the CPU (of
    ``config``, or of :func:`tiny_sdxl_config` written into ``folder``)."""
    sgm_dir()
    from lorakit_ext.models.sgm_import import build_sgm

    from lorakit_ext.models.sgm import parameterization_of
    from lorakit_ext.models.tiny import reset_zero_initialised

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sgm(config or tiny_sdxl_config(folder, v), init_weights=True)
        reset_zero_initialised(model)
    model.parameterization = parameterization_of(model)
    return model


def write_tiny_sdxl_checkpoint(folder: Path, v: bool = False, seed: int = 1234) -> Path:
    """The tiny SDXL as users have checkpoints: one fp16 .safetensors in sgm's key layout, its .yaml
    beside it (no full-size widths to guess from)."""
    import safetensors.torch
    from omegaconf import OmegaConf

    from lorakit_ext.models.tiny import fp16_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    sgm_dir()
    config = tiny_sdxl_config(folder, v)
    model = build_tiny_sdxl(folder, seed, v, config)
    path = folder / ("tiny-sdxl-v.safetensors" if v else "tiny-sdxl.safetensors")
    safetensors.torch.save_file(fp16_checkpoint(model), str(path))
    path.with_suffix(".yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    return path
