"""Gradient checkpointing that gives LoRA weights their gradients.

ldm's blocks have their own checkpoint flag, backed by a legacy autograd function that recomputes
with ``torch.autograd.grad`` over the parameters it was handed when the block ran; A1111 patches
only some blocks. We switch those flags off and wrap each ResBlock / transformer block in
``torch.utils.checkpoint`` (non-reentrant), which tracks every parameter used in the recompute,
including the LoRA weights peft injected into the block.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

# Class names, not classes: A1111 ships its own copy of ldm, and both must match.
_BLOCKS = {"ResBlock": "use_checkpoint", "BasicTransformerBlock": "checkpoint"}


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def configure_checkpointing(unet: nn.Module, enabled: bool):
    """Turns ldm's own checkpoint flags off (a model config may set them) and, when ``enabled``,
    wraps the blocks; returns a function that undoes exactly what was done."""
    changed = []
    for module in unet.modules():
        flag = _BLOCKS.get(type(module).__name__)
        if flag is None:
            continue
        changed.append((module, flag, getattr(module, flag, False), "forward" in vars(module)))
        setattr(module, flag, False)
        if enabled:
            module.forward = _checkpointed(module.forward)

    def undo():
        for module, flag, old, had_own_forward in changed:
            setattr(module, flag, old)
            if not enabled:
                continue
            if had_own_forward:
                module.forward = module.forward.__wrapped__
            else:
                del module.forward

    return undo
