"""ldm's ``GroupNorm32`` for training: the same fp32 arithmetic, half the memory kept for backward.

``GroupNorm32`` normalises ``x.float()``; autograd then keeps that fp32 copy of every normalised
activation until the backward pass, twice the size of the half-precision input it came from.
This forward keeps the input as it is and makes the fp32 copy again in backward. Forward and
gradients are the stock ones bit for bit (the fp32 copy of a half tensor is exact); for SD1.5 at
512² it is the difference between our peak memory and kohya's. fp32 models are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit_ext.models.layout import memory_format_of
from lorakit_ext.models.patching import patch_forwards


def _layout(x: torch.Tensor) -> torch.memory_format:
    # As aten's group_norm: the CPU kernels take a channels_last input as it is, the CUDA kernels
    # only the standard layout.
    return memory_format_of(x) if x.device.type == "cpu" else torch.contiguous_format


class _GroupNormFromHalf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):
        n, c = x.shape[:2]
        hw = x.numel() // max(n * c, 1)
        xf = x.float().contiguous(memory_format=_layout(x))
        out, mean, rstd = torch.ops.aten.native_group_norm(xf, weight.float(), bias.float(), n, c, hw, groups, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.shape = (n, c, hw, groups)
        ctx.param_dtypes = (weight.dtype, bias.dtype)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        n, c, hw, groups = ctx.shape
        layout = _layout(x)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            grad.float().contiguous(memory_format=layout), x.float().contiguous(memory_format=layout),
            mean, rstd, weight.float(), n, c, hw, groups, mask,
        )
        return (
            gx.to(x.dtype) if gx is not None else None,
            gw.to(ctx.param_dtypes[0]) if gw is not None else None,
            gb.to(ctx.param_dtypes[1]) if gb is not None else None,
            None,
            None,
        )


def _forward(module: nn.GroupNorm):
    stock = type(module).forward

    def forward(x):
        if x.dtype == torch.float32 or not torch.is_grad_enabled():
            return stock(module, x)
        return _GroupNormFromHalf.apply(x, module.weight, module.bias, module.num_groups, module.eps)

    return forward


def use_half_saving_group_norm(unet: nn.Module):
    """Patches ldm's and sgm's ``GroupNorm32`` modules (the same class); returns the function that removes the patch."""
    stock = [m for m in unet.modules() if type(m).__name__ == "GroupNorm32" and type(m).__module__.startswith(("ldm.", "sgm.")) and m.affine]
    return patch_forwards(stock, _forward)
