"""Where a run's long-lived GPU allocations land, so that peak memory stays at kohya's level.

Peak memory with CUDA graphs is the base weights, plus the graph's private pool, plus whatever
the default pool cannot give back. ``empty_cache`` gives back only whole segments, so one small
long-lived block allocated inside a large segment of short-lived activations pins all of it
(measured: a 32 MiB cuBLAS workspace created during latent caching held a 514 MiB VAE segment).
"""

from __future__ import annotations

import os
import time
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


# The VAE encoder's activations at their peak per pixel of a batch: SDXL's VAE on one 1024² image
# in bf16 peaked 1.67 GiB above the resident model (about 1.7 kB per pixel); twice that covers a
# VAE that runs in fp32 (an fp16 SDXL VAE does).
VAE_BYTES_PER_PIXEL = 3500


def cuda_index(device: torch.device) -> int:
    """The index of a CUDA ``device``; ``"cuda"`` alone means the current one. Some of torch's
    memory calls take only an index (``set_per_process_memory_fraction``; ``mem_get_info`` before
    torch 2.2)."""
    return device.index if device.index is not None else torch.cuda.current_device()


ALLOCATOR_SETTINGS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def grow_segments_in_place(device: torch.device) -> bool:
    """Turns on torch's expandable segments for a headless run on ``device``, unless the user set
    the allocator up (an ``ALLOCATOR_SETTINGS`` variable); whether they are on.

    Segments that grow in place leave no gaps between activations of different sizes: SDXL at
    batch 4 reserved 0.65–0.9 GiB less at the same speed. Not inside a WebUI, whose allocator
    serves its own generation too. Call it before the model reaches the GPU.
    """
    # torch 2.9 moved the setter and deprecated the CUDA one.
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if device.type != "cuda" or setter is None or any(name in os.environ for name in ALLOCATOR_SETTINGS):
        return False
    try:
        setter("expandable_segments:True")
    except RuntimeError:  # a platform without them (Windows before torch 2.6, ROCm)
        return False
    return True


def has_room(device: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` more fit on ``device`` now: free memory plus what torch's cache holds
    unused, within the process's memory fraction where one is set. Always on the CPU."""
    if device.type != "cuda":
        return True
    index = cuda_index(device)
    free, total = torch.cuda.mem_get_info(index)
    allocated = torch.cuda.memory_allocated(index)
    room = free + torch.cuda.memory_reserved(index) - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 1.0)(index)
    return min(room, fraction * total - allocated) >= nbytes


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


class Residency:
    """Which of the model's modules wait on the CPU during each part of a run's start, so that the
    start never holds more of the GPU than the steps will.

    A loaded model keeps UNet, text encoders and VAE on the GPU. Caching latents needs the VAE
    alone, caching text-encoder outputs the encoders alone; with everything resident, SDXL's
    latent caching at 1024² peaked 1.5 GiB above its training steps (the encoders' 1.6 GB beside
    the VAE's activations). kohya loads the UNet only after caching for the same reason.
    ``away`` parks (:func:`park`), ``back`` returns; leaving the block returns whatever is still
    away, also after an exception. ``seconds``: the time the moves took.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self._undo: dict[nn.Module, Callable[[], None]] = {}

    def away(self, *modules: nn.Module) -> None:
        started = time.perf_counter()
        for module in modules:
            if module not in self._undo:
                self._undo[module] = park(module, self.device)
        self.seconds += time.perf_counter() - started

    def back(self, *modules: nn.Module) -> None:
        started = time.perf_counter()
        if self.device.type == "cuda":
            # The cache still holds the last phase's activation blocks, shaped for another model.
            torch.cuda.empty_cache()
        for module in modules:
            self._undo.pop(module, lambda: None)()
        self.seconds += time.perf_counter() - started

    def __enter__(self) -> "Residency":
        return self

    def __exit__(self, *exc) -> None:
        self.back(*reversed(list(self._undo)))
