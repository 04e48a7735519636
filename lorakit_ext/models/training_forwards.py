"""The UNet forwards a training run swaps in for its length: the same function, fewer copies.

Each is a per-instance (or per-module-function) patch that comes off again when the run ends, so
the host's model is left exactly as it was.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from lorakit_ext.models.group_norm import use_half_saving_group_norm
from lorakit_ext.models.layer_norm import use_half_layer_norm
from lorakit_ext.models.sdpa import use_sdpa
from lorakit_ext.models.spatial_transformer import use_layout_keeping_transformers
from lorakit_ext.models.timestep import use_device_timestep_embedding


def use_training_forwards(unet: nn.Module, device: torch.device, *, stock_attention: bool) -> Callable[[], None]:
    """GroupNorm and LayerNorm without fp32 copies, transformers that keep their input's layout,
    the timestep embedding looked up on a CUDA device, and (``stock_attention``: headless ldm,
    which materialises the attention matrix) SDPA; returns the function that takes them all off."""
    stack = contextlib.ExitStack()
    stack.callback(use_half_saving_group_norm(unet))
    stack.callback(use_half_layer_norm(unet))
    stack.callback(use_layout_keeping_transformers(unet))
    if stock_attention:
        stack.callback(use_sdpa(unet))
    if device.type == "cuda":
        stack.callback(use_device_timestep_embedding(unet, device))
    return stack.close
