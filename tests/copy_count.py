"""Counting the copies an operation runs: the casts and relayouts a patched forward is there to save."""

from __future__ import annotations

import torch


class Copies(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the copies (casts, relayouts) that run inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.split(".")[0] in ("_to_copy", "clone", "copy_")
        return func(*args, **(kwargs or {}))
