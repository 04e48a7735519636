"""Randomly initialised SDXL models (sgm's ``DiffusionEngine``, as A1111 runs SDXL): full-size for
benchmarks, or tiny for a CPU smoke run, and their single-file checkpoint in A1111's key layout.

Both keep every SDXL module name — block, layer and transformer counts are SDXL base's, only the
widths of the tiny one are small (UNet 32/64/128, CLIP-L 32 wide, bigG 64 wide: GroupNorm needs
multiples of 32) — so LoRA keys, kohya names and checkpoint keys are the real ones. sgm itself is
not on PyPI: :func:`~lorakit_ext.models.sgm_import.import_sgm` says where it comes from. Nothing is
downloaded.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..fsutil import atomic_write_text
from .checkpoint import place_model
from .clip_tokenizer import build_clip_tokenizer_files
from .families.sdxl import SDXL
from .sd_configs import SD1_TEXT_ENCODER_ID, SdxlWidths, sdxl_config
from .tiny import fp16_checkpoint, reset_zero_initialised

TINY_SDXL_WIDTHS = SdxlWidths(model_channels=32, num_head_channels=16, clip_l_width=32, big_g_width=64, vae_channels=32)
TINY_BIG_G_ARCH = "lorakit-tiny-sdxl-bigG"
# Depths are SDXL's own: CLIP-L's 12 layers (SDXL conditions on layer 11), bigG's 32.
_TINY_CLIP_L = {"intermediate_size": 4 * TINY_SDXL_WIDTHS.clip_l_width, "num_attention_heads": 4, "num_hidden_layers": 12}
_TINY_BIG_G_TEXT = {"context_length": 77, "vocab_size": 49408, "width": TINY_SDXL_WIDTHS.big_g_width, "heads": 4, "layers": 32}
_TINY_VISION = {"image_size": 28, "layers": 1, "width": 32, "head_width": 16, "patch_size": 14}
# CLIP-L's weights in SDXL files sit under transformers 4's text_model level; transformers 5 has none.
_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
_CLIP_L_TEXT_MODEL = _CLIP_L_PREFIX + "text_model."


def _write_tiny_text_encoders(folder: Path) -> tuple[Path, str]:
    """CLIP-L's tokenizer and tiny config in ``folder/clip-l``; a tiny bigG architecture registered
    with open_clip. Returns (the CLIP-L folder, the bigG architecture's name)."""
    from transformers import CLIPTextConfig

    from .ldm_import import import_torchvision

    import_torchvision()  # before open_clip, which imports torchvision
    import open_clip

    clip_l = folder / "clip-l"
    build_clip_tokenizer_files(clip_l)
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                            hidden_size=TINY_SDXL_WIDTHS.clip_l_width, **_TINY_CLIP_L)
    atomic_write_text(clip_l / "config.json", config.to_json_string())
    if open_clip.get_model_config(TINY_BIG_G_ARCH) is None:
        arch = folder / f"{TINY_BIG_G_ARCH}.json"
        arch.write_text(json.dumps({"embed_dim": TINY_SDXL_WIDTHS.big_g_width, "vision_cfg": _TINY_VISION, "text_cfg": _TINY_BIG_G_TEXT}))
        open_clip.add_model_config(arch)
    return clip_l, TINY_BIG_G_ARCH


def build_random_sdxl(device: torch.device | str, dtype: torch.dtype, full: bool = True, seed: int = 1234) -> torch.nn.Module:
    """sgm's SDXL base ``DiffusionEngine`` (ε-prediction) with random weights, full-size or tiny,
    on ``device`` in ``dtype``.

    Every weight is drawn by its module's own initialiser on the CPU (sgm and open_clip leave some
    parameters as bare ``torch.empty`` for their own init to fill, so no generic re-initialisation
    covers them all); then the zero-initialised output layers get random weights too, or the UNet
    would predict 0 and no LoRA would get a gradient.
    """
    from .sgm_import import build_sgm

    with tempfile.TemporaryDirectory(prefix="lorakit-sdxl-text-") as tmp:
        if full:
            # The hub id: the builder puts CLIP-L's tokenizer and config in a folder of its own.
            config = sdxl_config(False, clip_l_folder=SD1_TEXT_ENCODER_ID)
        else:
            clip_l, big_g = _write_tiny_text_encoders(Path(tmp))
            config = sdxl_config(False, clip_l_folder=clip_l, big_g_arch=big_g, widths=TINY_SDXL_WIDTHS)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_sgm(config, init_weights=True)
            reset_zero_initialised(model)
    place_model(model, device, dtype)
    return model


def _file_key(key: str) -> str:
    if key.startswith(_CLIP_L_PREFIX) and not key.startswith(_CLIP_L_TEXT_MODEL):
        return _CLIP_L_TEXT_MODEL + key[len(_CLIP_L_PREFIX):]
    return key


def sdxl_file_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as SDXL base files hold them, in fp16: sgm's keys (``model.diffusion_model.``,
    ``conditioner.embedders.0/1.``, ``first_stage_model.``), CLIP-L under ``text_model.`` whichever
    transformers built it, and none of the tables sgm derives from its config."""
    return {_file_key(k): v for k, v in fp16_checkpoint(model).items() if not k.startswith(SDXL.derived_keys)}


def write_random_sdxl(path: Path, full: bool = True) -> Path:
    """A random SDXL base checkpoint, fp16, in A1111's single-file layout, built and written on the CPU."""
    import safetensors.torch

    # Converted to fp16 in place, module by module: the full-size model peaks at its fp32 size
    # (14 GB) instead of that plus an fp16 copy.
    model = build_random_sdxl("cpu", torch.float16, full=full)
    safetensors.torch.save_file(sdxl_file_tensors(model), str(path), metadata={"format": "pt"})
    return path
