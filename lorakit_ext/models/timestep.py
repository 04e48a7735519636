"""The UNet's sinusoidal timestep embedding, looked up on the device.

ldm (and sgm, SDXL's) builds the embedding's frequencies on the CPU and copies them to the GPU on every call; a copy
from host memory cannot live in a CUDA graph. For the trainer's integer timesteps we compute the
embedding of all 1000 timesteps once on the device (with whatever function is installed, A1111's
patched one included) and index it: the same numbers, no host copy.
"""

from __future__ import annotations

import importlib

import torch

TIMESTEPS = 1000


def use_device_timestep_embedding(unet: torch.nn.Module, device: torch.device):
    """Installs the lookup in the module ``unet``'s class comes from (ldm's or sgm's
    ``openaimodel``); returns the function that puts the original back."""
    unet_module = importlib.import_module(type(unet).__module__)
    original = unet_module.timestep_embedding
    tables: dict[tuple, torch.Tensor] = {}

    def lookup(timesteps, dim, max_period=10000, repeat_only=False):
        if repeat_only or timesteps.is_floating_point() or timesteps.device != device:
            return original(timesteps, dim, max_period=max_period, repeat_only=repeat_only)
        key = (dim, max_period)
        if key not in tables:
            tables[key] = original(torch.arange(TIMESTEPS, device=device), dim, max_period=max_period)
        return tables[key][timesteps]

    unet_module.timestep_embedding = lookup

    def undo() -> None:
        unet_module.timestep_embedding = original

    return undo
