"""GroupNorm (optionally with the SiLU that follows it) for channels_last half-precision activations,
forward and backward, as Triton kernels that read and write the layout they are given.

aten's CUDA GroupNorm takes only the standard layout, so a channels_last UNet pays a layout copy
in and out of every GroupNorm, and the half → fp32 → half round trips around it, in both passes.
These kernels read the half activations where they lie (each group's channels are contiguous in
every pixel), keep the statistics and the arithmetic in fp32 and write half results in place of
those copies; SiLU is applied to the result in the same pass, and its gradient in the backward one.
Saved for backward: the half input and two fp32 numbers per (image, group), as the half-saving path
of :mod:`lorakit_ext.models.group_norm`.

Statistics combine per-block means and squared deviations (Chan's parallel formula), the variance
is the biased one, as aten's. Import this module only where Triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of a block (pixels × the group's channels); enough for wide loads, small for registers.
_BLOCK_ELEMENTS = 4096


@triton.jit
def _forward_kernel(X, W, B, Y, Mean, Rstd, HW, C, G, CG, eps,
                    SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)  # image n, group g
    n = row // G
    g = row % G
    base = n * HW * C + g * CG
    c = tl.arange(0, BLOCK_C)
    cmask = c < CG
    mean = tl.zeros((), tl.float32)
    m2 = tl.zeros((), tl.float32)
    count = tl.zeros((), tl.float32)
    for start in range(0, HW, BLOCK_HW):
        p = start + tl.arange(0, BLOCK_HW)
        mask = (p < HW)[:, None] & cmask[None, :]
        x = tl.load(X + base + p[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        block_count = tl.sum(mask.to(tl.float32), axis=1)
        block_count = tl.sum(block_count, axis=0)
        block_mean = tl.sum(tl.sum(x, axis=1), axis=0) / block_count
        deviation = tl.where(mask, x - block_mean, 0.0)
        block_m2 = tl.sum(tl.sum(deviation * deviation, axis=1), axis=0)
        total = count + block_count
        delta = block_mean - mean
        mean = mean + delta * block_count / total
        m2 = m2 + block_m2 + delta * delta * count * block_count / total
        count = total
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)
    w = tl.load(W + g * CG + c, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(B + g * CG + c, mask=cmask, other=0.0).to(tl.float32)
    for start in range(0, HW, BLOCK_HW):
        p = start + tl.arange(0, BLOCK_HW)
        mask = (p < HW)[:, None] & cmask[None, :]
        offsets = base + p[:, None] * C + c[None, :]
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w[None, :] + b[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(DY, X, W, B, Mean, Rstd, DX, DW, DB, HW, C, G, CG,
                     SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    n = row // G
    g = row % G
    base = n * HW * C + g * CG
    c = tl.arange(0, BLOCK_C)
    cmask = c < CG
    mean = tl.load(Mean + row)
    rstd = tl.load(Rstd + row)
    w = tl.load(W + g * CG + c, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(B + g * CG + c, mask=cmask, other=0.0).to(tl.float32)
    sum_dxhat = tl.zeros((), tl.float32)
    sum_dxhat_xhat = tl.zeros((), tl.float32)
    dw = tl.zeros((BLOCK_C,), tl.float32)
    db = tl.zeros((BLOCK_C,), tl.float32)
    for start in range(0, HW, BLOCK_HW):
        p = start + tl.arange(0, BLOCK_HW)
        mask = (p < HW)[:, None] & cmask[None, :]
        offsets = base + p[:, None] * C + c[None, :]
        xhat = tl.where(mask, (tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
        dz = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            z = xhat * w[None, :] + b[None, :]
            s = tl.sigmoid(z)
            dz = tl.where(mask, dz * s * (1.0 + z * (1.0 - s)), 0.0)
        dw += tl.sum(dz * xhat, axis=0)
        db += tl.sum(dz, axis=0)
        dxhat = dz * w[None, :]
        sum_dxhat += tl.sum(tl.sum(dxhat, axis=1), axis=0)
        sum_dxhat_xhat += tl.sum(tl.sum(dxhat * xhat, axis=1), axis=0)
    tl.store(DW + n * C + g * CG + c, dw, mask=cmask)
    tl.store(DB + n * C + g * CG + c, db, mask=cmask)
    count = (HW * CG).to(tl.float32)
    m1 = sum_dxhat / count
    m2 = sum_dxhat_xhat / count
    for start in range(0, HW, BLOCK_HW):
        p = start + tl.arange(0, BLOCK_HW)
        mask = (p < HW)[:, None] & cmask[None, :]
        offsets = base + p[:, None] * C + c[None, :]
        xhat = (tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        dz = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            z = xhat * w[None, :] + b[None, :]
            s = tl.sigmoid(z)
            dz = dz * s * (1.0 + z * (1.0 - s))
        dx = rstd * (dz * w[None, :] - m1 - xhat * m2)
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)


def _blocks(channels_per_group: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(channels_per_group)
    return max(16, _BLOCK_ELEMENTS // block_c), block_c


class GroupNormSiLU(torch.autograd.Function):
    """``silu(group_norm(x))`` (or the norm alone) of a channels_last ``[N, C, H, W]`` tensor."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, silu: bool):
        n, c, h, w = x.shape
        y = torch.empty_like(x, memory_format=torch.channels_last)
        mean = torch.empty(n * groups, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block_hw, block_c = _blocks(c // groups)
        _forward_kernel[(n * groups,)](x, weight, bias, y, mean, rstd, h * w, c, groups, c // groups, eps,
                                       SILU=silu, BLOCK_HW=block_hw, BLOCK_C=block_c)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.silu = groups, silu
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        groups = ctx.groups
        grad = grad.contiguous(memory_format=torch.channels_last)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        dw = torch.empty(n, c, device=x.device, dtype=torch.float32)
        db = torch.empty_like(dw)
        block_hw, block_c = _blocks(c // groups)
        _backward_kernel[(n * groups,)](grad, x, weight, bias, mean, rstd, dx, dw, db, h * w, c, groups, c // groups,
                                        SILU=ctx.silu, BLOCK_HW=block_hw, BLOCK_C=block_c)
        return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype), None, None, None


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float, silu: bool) -> torch.Tensor:
    x = x.contiguous(memory_format=torch.channels_last)
    return GroupNormSiLU.apply(x, weight, bias, groups, eps, silu)
