"""Regional ``torch.compile`` of the UNet: each input, middle and output block compiled on its own.

A whole-UNet compile traces one huge graph per bucket shape; block by block, every block of the
same class shares one traced function (``TimestepEmbedSequential.forward``), so a repeated block
shape costs its compile once. Inductor then fuses what eager PyTorch runs as separate kernels —
the casts, layout copies and elementwise work around GroupNorm, SiLU, GEGLU and the LoRA adds.
Shapes are static (``dynamic=False``): every bucket shape is compiled for itself, which is what a
CUDA graph captures anyway.

Only training steps run compiled: validation and samples (no grad) call the stock forward, so they
never add compiles of their own. Whether the compile time pays for itself depends on the run's
length and number of bucket shapes; ``bench train --compile-blocks off,on`` measures it.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch._dynamo
from torch import nn

from lorakit_ext.models.patching import patch_forwards

BACKEND = "inductor"
# Every block of a class shares the compiled code's cache: one entry per block and bucket shape.
# dynamo's default limit (8) would quietly send the rest back to eager.
_ENTRIES_PER_BLOCK_AND_SHAPE = 64


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """ldm's and sgm's UNet blocks in the order they run."""
    return [*unet.input_blocks, unet.middle_block, *unet.output_blocks]


def _limit_name() -> str:
    config = torch._dynamo.config
    return "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"


def _forward(block: nn.Module):
    stock = block.forward
    compiled = torch.compile(stock, dynamic=False, backend=BACKEND)

    def forward(*args, **kwargs):
        return compiled(*args, **kwargs) if torch.is_grad_enabled() else stock(*args, **kwargs)

    return forward


def compile_blocks(unet: nn.Module) -> Callable[[], None]:
    """Gives each UNet block a compiled forward for gradient-enabled calls; returns the function
    that removes them and the raised recompile limit again. Install after every other forward
    patch of the run, so that the compiled code traces them."""
    blocks = unet_blocks(unet)
    stack = contextlib.ExitStack()
    stack.enter_context(torch._dynamo.config.patch(**{_limit_name(): _ENTRIES_PER_BLOCK_AND_SHAPE * len(blocks)}))
    undo = patch_forwards(blocks, _forward)
    stack.callback(torch._dynamo.reset)
    stack.callback(undo)
    return stack.close
