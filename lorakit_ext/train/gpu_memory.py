"""Where a run's long-lived GPU allocations land, so that peak memory stays at kohya's level.

Peak memory with CUDA graphs is the base weights, plus the graph's private pool, plus whatever
the default pool cannot give back. ``empty_cache`` gives back only whole segments, so one small
long-lived block allocated inside a large segment of short-lived activations pins all of it
(measured: a 32 MiB cuBLAS workspace created during latent caching held a 514 MiB VAE segment).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def prime_workspaces(device: torch.device) -> None:
    """Creates cuBLAS's workspace for this thread and stream in a segment of its own.

    cuBLAS allocates a workspace from torch's cache at the first matmul of each thread on each
    stream and keeps it for the process's lifetime. A tiny matmul on a freshly emptied cache
    makes it before the VAE's activations fill the cache. A no-op where it exists already (a
    WebUI that has generated); the training step's streams get theirs in :mod:`graphs`.
    """
    if device.type != "cuda":
        return
    torch.cuda.empty_cache()
    a = torch.ones(16, 16, device=device)
    a @ a


def park(module: nn.Module, training_device: torch.device) -> Callable[[], None]:
    """Moves ``module`` to the CPU if it sits on ``training_device`` (a GPU); returns the undo.

    For the VAE once latents are cached, and the text encoders once their outputs are: idle until
    the run ends (kohya moves them for the same reason); SD1's VAE is 160 MB in fp16, SDXL's two
    text encoders 1.6 GB. ``Module.to`` keeps the parameter
    objects, so moving back restores the user's VAE exactly.
    """
    param = next(module.parameters(), None)
    if training_device.type == "cpu" or param is None or param.device != training_device:
        return lambda: None
    module.to("cpu")
    # The encoder's cached activation blocks are no use to the UNet's step shapes.
    torch.cuda.empty_cache()
    return lambda: module.to(training_device)
