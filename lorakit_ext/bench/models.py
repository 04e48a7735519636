"""The model families ``bench train`` measures, one table entry each: the random-initialised model
our rows train, the random checkpoint kohya's rows load with the tokenizers sd-scripts looks for,
and the family's own defaults.

Throughput and memory do not depend on weight values, so no real weights are needed; the weights
are still random draws of each module's own initialiser (finite, of realistic scale), never
uninitialised memory that could hold NaN or inf.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit_ext.models.families.base import ModelFamily
from lorakit_ext.models.families.sd1 import SD1
from lorakit_ext.models.families.sdxl import SDXL
from lorakit_ext.models.tiny import build_random_sd15, fp16_checkpoint
from lorakit_ext.models.tiny_sdxl import build_random_sdxl, write_random_sdxl


@dataclass(frozen=True)
class Tokenizer:
    """A tokenizer sd-scripts loads by hub id; with ``tokenizer_cache_dir`` set it looks first in
    ``<tokenizer_cache_dir>/<hub id with "/" → "_">``, where the benchmark builds it offline."""

    hub_id: str
    pad_token: str | None = None  # None: CLIP-L's (EOS)

    @property
    def folder(self) -> str:
        return self.hub_id.replace("/", "_")


@dataclass(frozen=True)
class BenchFamily:
    name: str  # what --family takes
    label: str  # the full-size model, as the report names it
    family: ModelFamily  # its kohya_script is the sd-scripts script kohya's rows run
    build: Callable[[torch.device, torch.dtype, bool], nn.Module]  # (device, dtype, full) → model
    write_checkpoint: Callable[[Path], Path]  # a full-size checkpoint sd-scripts loads, written on the CPU
    tokenizers: tuple[Tokenizer, ...]
    defaults: Mapping[str, object]  # bench options this family changes: resolution, train, batch, text cache
    settings: Mapping[str, object] = field(default_factory=dict)  # TrainConfig fields of every row
    # kohya sd-scripts 48d368f alone on one H200 (bf16, SDPA, cached latents, 300 steps, no gradient
    # checkpointing): steady-state it/s by (train, batch).
    kohya_h200: Mapping[tuple[str, int], float] = field(default_factory=dict)


def write_random_sd15(path: Path) -> Path:
    """A full-size SD1.5 checkpoint with random weights, fp16, in the ldm/A1111 layout. Built on the
    CPU: a CUDA context of ours would count in kohya's nvidia-smi peak."""
    import safetensors.torch

    model = build_random_sd15("cpu", torch.float32, full=True)
    safetensors.torch.save_file(fp16_checkpoint(model), str(path), metadata={"format": "pt"})
    return path


CLIP_L = Tokenizer("openai/clip-vit-large-patch14")
# SDXL's second tokenizer is bigG's: CLIP's vocabulary, padded with "!" (id 0) as open_clip pads.
BIG_G = Tokenizer("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", pad_token="!")

FAMILIES: dict[str, BenchFamily] = {
    "sd1": BenchFamily(
        name="sd1", label="SD1.5", family=SD1, build=build_random_sd15, write_checkpoint=write_random_sd15, tokenizers=(CLIP_L,),
        # kohya-colab's SD1.5 settings.
        defaults={"resolution": 512, "train": "te", "batch": "2", "cache_text_encoder_outputs": False},
        kohya_h200={("te", 2): 3.46, ("unet", 2): 4.38, ("unet", 8): 4.91},
    ),
    "sdxl": BenchFamily(
        name="sdxl", label="SDXL", family=SDXL, build=build_random_sdxl, write_checkpoint=write_random_sdxl, tokenizers=(CLIP_L, BIG_G),
        # What SDXL LoRAs are trained at on one GPU: 1024², the UNet alone on cached text-encoder outputs.
        defaults={"resolution": 1024, "train": "unet", "batch": "1,4", "cache_text_encoder_outputs": True},
        # SDXL conditions on fixed layers (CLIP-L's 11th, bigG's penultimate): it has no clip skip.
        settings={"clip_skip": 1},
    ),
}
