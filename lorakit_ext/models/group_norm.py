"""ldm's ``GroupNorm32`` for training: the same fp32 arithmetic, half the memory kept for backward.

``GroupNorm32`` normalises ``x.float()``; autograd then keeps that fp32 copy of every normalised
activation until the backward pass, twice the size of the half-precision input it came from.
This forward keeps the input as it is and makes the fp32 copy again in backward. Forward and
gradients are the stock ones bit for bit (the fp32 copy of a half tensor is exact); for SD1.5 at
512² it is the difference between our peak memory and kohya's. fp32 models are left as they are.

With ``LORAKIT_TRITON_GROUP_NORM=1`` and Triton installed, channels_last half activations go through
:mod:`lorakit_ext.models.triton_group_norm` instead (no layout or fp32 copies), fused with the SiLU
that follows a GroupNorm in ResBlocks and the output head. Opt-in until its speed on a GPU has been
measured against this path.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lorakit_ext.models.layout import memory_format_of
from lorakit_ext.models.patching import patch_forwards


def _layout(x: torch.Tensor) -> torch.memory_format:
    # As aten's group_norm: the CPU kernels take a channels_last input as it is, the CUDA kernels
    # only the standard layout.
    return memory_format_of(x) if x.device.type == "cpu" else torch.contiguous_format


def _fp32(t: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    # Cast and relayout in one copy: ``t.float().contiguous()`` of a channels_last half tensor
    # writes the fp32 tensor twice.
    return t.to(torch.float32, memory_format=layout)


def _half(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Back in the layout the activation came in: a channels_last UNet's next convolution would
    # otherwise copy a standard-layout result into channels_last again.
    return t.to(like.dtype, memory_format=memory_format_of(like))


class _GroupNormFromHalf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):
        n, c = x.shape[:2]
        hw = x.numel() // max(n * c, 1)
        out, mean, rstd = torch.ops.aten.native_group_norm(_fp32(x, _layout(x)), weight.float(), bias.float(), n, c, hw, groups, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.shape = (n, c, hw, groups)
        ctx.param_dtypes = (weight.dtype, bias.dtype)
        return _half(out, x)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        n, c, hw, groups = ctx.shape
        layout = _layout(x)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            _fp32(grad, layout), _fp32(x, layout), mean, rstd, weight.float(), n, c, hw, groups, mask,
        )
        return (
            _half(gx, x) if gx is not None else None,
            gw.to(ctx.param_dtypes[0]) if gw is not None else None,
            gb.to(ctx.param_dtypes[1]) if gb is not None else None,
            None,
            None,
        )


TRITON_ENV = "LORAKIT_TRITON_GROUP_NORM"


def _triton_group_norm():
    """The Triton GroupNorm(+SiLU), or None: asked for with ``LORAKIT_TRITON_GROUP_NORM=1`` and Triton installed."""
    if os.environ.get(TRITON_ENV) != "1":
        return None
    try:
        from lorakit_ext.models.triton_group_norm import group_norm_silu
    except ImportError:
        return None
    return group_norm_silu


def _triton_takes(x: torch.Tensor) -> bool:
    on_device = x.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return on_device and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _forward(module: nn.GroupNorm, kernel, silu: bool):
    """The module's forward; ``silu``: it also applies the SiLU that follows it (patched to pass through)."""
    stock = type(module).forward

    def forward(x):
        if x.dtype == torch.float32 or not torch.is_grad_enabled():
            y = stock(module, x)
        elif kernel is not None and _triton_takes(x):
            return kernel(x, module.weight, module.bias, module.num_groups, module.eps, silu)
        else:
            y = _GroupNormFromHalf.apply(x, module.weight, module.bias, module.num_groups, module.eps)
        return nn.functional.silu(y) if silu else y

    return forward


def _silus_after(unet: nn.Module, norms: list[nn.Module]) -> dict[int, nn.Module]:
    """``{id(norm): the nn.SiLU right after it}`` in the UNet's Sequentials (ResBlocks, the output
    head), for pairs neither of which carries a patch already."""
    ids = {id(m) for m in norms}
    pairs = {}
    for seq in unet.modules():
        if isinstance(seq, nn.Sequential):
            children = list(seq)
            for first, second in zip(children, children[1:]):
                if id(first) in ids and type(second) is nn.SiLU and "forward" not in vars(second) and "forward" not in vars(first):
                    pairs[id(first)] = second
    return pairs


def _passes_through(module: nn.Module):
    return lambda x: x


def use_half_saving_group_norm(unet: nn.Module):
    """Patches ldm's and sgm's ``GroupNorm32`` modules (the same class), and with the Triton kernels
    the SiLUs fused into them; returns the function that removes the patches."""
    stock = [m for m in unet.modules() if type(m).__name__ == "GroupNorm32" and type(m).__module__.startswith(("ldm.", "sgm.")) and m.affine]
    kernel = _triton_group_norm()
    fused = _silus_after(unet, stock) if kernel is not None else {}
    undo_norms = patch_forwards(stock, lambda m: _forward(m, kernel, id(m) in fused))
    undo_silus = patch_forwards(fused.values(), _passes_through)

    def undo() -> None:
        undo_silus()
        undo_norms()

    return undo
