"""A tiny SDXL-layout model built from sgm's (Stability-AI/generative-models) own classes and its
own ``sd_xl_base.yaml``, the config A1111 builds SDXL from.

sgm is not on PyPI: ``LORAKIT_SGM_DIR`` names a checkout (A1111 keeps one in
``repositories/generative-models``); without it the tests that need the model skip. Every block,
layer and transformer count is SDXL base's, so every module name (and kohya name) is the real
one; only the widths are tiny, as in the a1111 harness's tiny SDXL (UNet 32/64/128, CLIP-L 32
wide, bigG 64 wide: GroupNorm needs multiples of 32).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

SGM_SKIP = "sgm (Stability-AI/generative-models) not found; set LORAKIT_SGM_DIR"
TINY_OPEN_CLIP = "lorakit-tiny-sdxl-bigG"
_CLIP_L = {"hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 12}
_BIG_G = {"width": 64, "heads": 4, "layers": 32}


def sgm_dir() -> Path:
    """The sgm checkout of ``LORAKIT_SGM_DIR``; skips the calling test without one."""
    folder = Path(os.environ.get("LORAKIT_SGM_DIR", "")).expanduser()
    if not os.environ.get("LORAKIT_SGM_DIR") or not (folder / "sgm" / "__init__.py").is_file():
        pytest.skip(SGM_SKIP)
    return folder


def _import_sgm(folder: Path):
    from lorakit_ext.models.ldm_import import import_torchvision

    import_torchvision()  # open_clip and pytorch-lightning import torchvision
    # sgm imports kornia at module level for image embedders SDXL does not have; A1111 installs it,
    # this project does not need it.
    try:
        import kornia  # noqa: F401
    except ImportError:
        sys.modules["kornia"] = types.ModuleType("kornia")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    with warnings.catch_warnings():  # pytorch-lightning's pkg_resources deprecation, as import_ldm hides it
        warnings.simplefilter("ignore")
        import sgm.util

    return sgm.util


def _write_clip_l(folder: Path) -> None:
    """Embedder 0's ``version`` folder: CLIP's tokenizer and a tiny ``CLIPTextModel``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorakit_ext.models.clip_tokenizer import build_clip_tokenizer_files

    build_clip_tokenizer_files(folder)
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", **_CLIP_L)
    CLIPTextModel(config).save_pretrained(folder)


def build_tiny_sdxl(folder: Path, seed: int = 1234) -> torch.nn.Module:
    """sgm's ``DiffusionEngine`` at tiny widths, in fp32 on the CPU; writes its text-encoder files into ``folder``."""
    from omegaconf import OmegaConf

    sgm_util = _import_sgm(sgm_dir())
    import open_clip

    torch.manual_seed(seed)
    clip_l = folder / "clip-l"
    _write_clip_l(clip_l)
    arch = folder / f"{TINY_OPEN_CLIP}.json"
    vision = {"image_size": 28, "layers": 1, "width": 32, "head_width": 16, "patch_size": 14}
    arch.write_text(json.dumps({"embed_dim": 64, "vision_cfg": vision, "text_cfg": {"context_length": 77, "vocab_size": 49408, **_BIG_G}}))
    open_clip.add_model_config(arch)

    cfg = OmegaConf.load(sgm_dir() / "configs" / "inference" / "sd_xl_base.yaml").model
    unet = cfg.params.network_config.params
    # context: CLIP-L + bigG widths; vector: pooled bigG + 3 size/crop pairs of 256 each.
    unet.update(model_channels=32, num_head_channels=16, context_dim=32 + 64, adm_in_channels=64 + 6 * 256, use_checkpoint=False)
    embedders = cfg.params.conditioner_config.params.emb_models
    embedders[0].params.update(version=str(clip_l), device="cpu")
    embedders[1].params.update(arch=TINY_OPEN_CLIP, version=None, device="cpu")
    vae = cfg.params.first_stage_config.params.ddconfig
    vae.update(ch=32, attn_type="vanilla")
    # sgm prints every block it builds.
    with contextlib.redirect_stdout(io.StringIO()):
        return sgm_util.instantiate_from_config(cfg).eval()
