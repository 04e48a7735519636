"""The UNet's LayerNorms for half-precision training: fp32 statistics without fp32 copies.

Autocast runs ``layer_norm`` in fp32: it casts the half input and the weight and bias up on every
call (the base weights do not require grad, so autocast's weight-cast cache never holds them),
returns an fp32 output, and each of the Linears reading that output (q, k and v after ``norm1``)
casts it back down again. Autograd also keeps the fp32 copy of the input for backward, twice the
half tensor. aten's CUDA ``layer_norm`` kernels for half inputs already compute in fp32 (statistics
and the affine) and round only the output, so calling them on the half input directly gives the
output the next Linear would have seen, with none of those copies. (Half training runs on CUDA
only; the CPU's half kernels round sooner, within a couple of half steps of the fp32 result.)

Only the UNet's transformer blocks are patched: there every LayerNorm output goes straight into a
Linear that autocast would round to half anyway. The text encoders' final LayerNorm is left as it
is, because A1111 computes prompt emphasis on that output and expects it in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit_ext.models.patching import patch_forwards

HALF = (torch.float16, torch.bfloat16)


def _forward(module: nn.LayerNorm):
    stock = type(module).forward

    def forward(x):
        if x.dtype not in HALF:
            return stock(module, x)
        weight = module.weight.to(x.dtype) if module.weight is not None else None
        bias = module.bias.to(x.dtype) if module.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)

    return forward


def use_half_layer_norm(unet: nn.Module):
    """Patches the UNet's ``nn.LayerNorm`` modules; returns the function that removes the patches."""
    norms = [m for m in unet.modules() if type(m) is nn.LayerNorm]
    return patch_forwards(norms, _forward)
