"""ldm's and sgm's ``SpatialTransformer`` without the layout copy at its exit.

The stock forward ends in ``rearrange(x, 'b (h w) c -> b c h w').contiguous()``. The rearranged
tokens are already a dense channels_last image, so in a channels_last run that ``.contiguous()``
writes the standard layout, and the next operation — ``proj_out``'s channels_last convolution
(SD1), or the residual add with the channels_last input (SD2, SDXL) — copies it straight back:
two activation-sized copies per transformer forward and two more in backward. Here the exit keeps
the layout the transformer's input had, which is the stock result in a standard-layout run and no
copy in a channels_last one. (A1111 patches ldm's class the same way for inference; its forward
is left alone here, as is any other instance-level patch.)
"""

from __future__ import annotations

from torch import nn

from lorakit_ext.models.layout import memory_format_of
from lorakit_ext.models.patching import patch_forwards


def _forward(module: nn.Module):
    def forward(x, context=None):
        contexts = context if isinstance(context, list) else [context]
        b, c, h, w = x.shape
        x_in = x
        x = module.norm(x)
        if not module.use_linear:
            x = module.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1).contiguous()
        if module.use_linear:
            x = module.proj_in(x)
        for i, block in enumerate(module.transformer_blocks):
            # sgm's rule: one context serves every block.
            x = block(x, context=contexts[i if len(contexts) > 1 else 0])
        if module.use_linear:
            x = module.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous(memory_format=memory_format_of(x_in))
        if not module.use_linear:
            x = module.proj_out(x)
        return x + x_in

    return forward


def use_layout_keeping_transformers(unet: nn.Module):
    """Patches the UNet's stock ldm and sgm ``SpatialTransformer`` modules; returns the function
    that removes the patches."""
    stock = [m for m in unet.modules()
             if type(m).__name__ == "SpatialTransformer" and type(m).forward.__module__.startswith(("ldm.", "sgm."))]
    return patch_forwards(stock, _forward)
