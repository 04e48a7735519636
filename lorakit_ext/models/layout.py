"""Changing the memory layout of a model's conv weights in place, in their own storage.

``Module.to(memory_format=torch.channels_last)`` allocates a new tensor for every 4-D weight and
frees the old one. On a model that was loaded before (A1111's), the freed blocks are holes between
other weights that the caching allocator can only hand to same-stream eager allocations; CUDA
graph pools and side streams cannot use them, so about the conv weights' size (1.1 GB for SD1.5)
stays reserved for nothing. A layout is only a stride order over the same number of elements, so
each weight is rewritten inside its own storage through a one-tensor temporary instead.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def memory_format_of(tensor: torch.Tensor) -> torch.memory_format:
    """channels_last for a tensor dense only in that layout, else the standard format."""
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _strides(shape: torch.Size, memory_format: torch.memory_format) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").contiguous(memory_format=memory_format).stride()


def relayout_(tensor: torch.Tensor, memory_format: torch.memory_format) -> None:
    """Rewrites a dense 4-D ``tensor`` (a Parameter or buffer) in ``memory_format``, same storage."""
    if tensor.dim() != 4 or tensor.is_contiguous(memory_format=memory_format):
        return
    if not (tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"cannot relayout a non-dense tensor of strides {tensor.stride()}")
    values = tensor.detach().clone()
    view = tensor.data.as_strided(tensor.shape, _strides(tensor.shape, memory_format), tensor.storage_offset())
    tensor.data = view
    with torch.no_grad():
        view.copy_(values)


def relayout_module(module: nn.Module, memory_format: torch.memory_format) -> Callable[[], None]:
    """Puts every 4-D parameter and buffer of ``module`` in ``memory_format``; returns the undo."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.dim() == 4]
    before = [memory_format_of(t) for t in tensors]
    for t in tensors:
        relayout_(t, memory_format)

    def undo() -> None:
        for t, fmt in zip(tensors, before):
            relayout_(t, fmt)

    return undo
