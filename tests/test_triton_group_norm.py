"""The channels_last GroupNorm (+ SiLU) Triton kernels against torch's GroupNorm and SiLU, forward
and backward. Off CUDA they run in Triton's interpreter (``TRITON_INTERPRET=1``); skipped where
Triton is not installed (CI's CPU torch has none)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
pytest.importorskip("triton", reason="Triton is not installed (it comes with CUDA builds of torch)")

from lorakit_ext.models.triton_group_norm import group_norm_silu  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(x, weight, bias, groups, eps, silu):
    y = torch.nn.functional.group_norm(x.float(), groups, weight.float(), bias.float(), eps)
    return torch.nn.functional.silu(y) if silu else y


# SD's shapes in small: 32 groups of 10 channels (320-wide levels), of 2 (64), odd sizes, a mean far from 0.
@pytest.mark.parametrize("shape,groups,silu,offset", [((2, 320, 6, 5), 32, True, 0.0), ((1, 64, 9, 7), 32, False, 3.0),
                                                     ((2, 96, 17, 3), 32, True, -1.5)])
def test_forward_and_backward_match_torch_in_half_precision(shape, groups, silu, offset):
    torch.manual_seed(0)
    dtype = torch.float16
    x = (torch.randn(shape) * 2 + offset).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = (torch.rand(shape[1]) + 0.5).to(DEVICE, dtype).requires_grad_()
    bias = torch.randn(shape[1]).to(DEVICE, dtype).requires_grad_()
    grad = torch.randn(shape).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)

    y = group_norm_silu(x, weight, bias, groups, 1e-5, silu)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    y.backward(grad)

    xs, ws, bs = (t.detach().float().requires_grad_() for t in (x, weight, bias))
    ref = _reference(xs, ws, bs, groups, 1e-5, silu)
    ref.backward(grad.float())
    torch.testing.assert_close(y.float(), ref, atol=2e-3, rtol=2e-3)  # one fp16 rounding of the result
    torch.testing.assert_close(x.grad.float(), xs.grad, atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(weight.grad.float(), ws.grad, atol=2e-2, rtol=2e-3)  # sums over many pixels, in fp16
    torch.testing.assert_close(bias.grad.float(), bs.grad, atol=2e-2, rtol=2e-3)


def test_the_unets_groupnorm_and_its_silu_run_fused_only_when_asked(monkeypatch):
    from ldm.modules.diffusionmodules.util import GroupNorm32

    from lorakit_ext.models.group_norm import TRITON_ENV, use_half_saving_group_norm

    torch.manual_seed(0)
    # fp32 GroupNorm parameters: ldm's GroupNorm32 on the CPU takes no others (on a GPU A1111's are half).
    norm = GroupNorm32(32, 64).to(DEVICE)
    net = torch.nn.Sequential(norm, torch.nn.SiLU(), torch.nn.Conv2d(64, 8, 3).to(DEVICE, torch.float16))
    x = torch.randn(2, 64, 8, 8).to(DEVICE, torch.float16).contiguous(memory_format=torch.channels_last).requires_grad_()
    plain = x.detach().contiguous()
    stock, stock_plain = net(x), net(plain)
    (stock_grad,) = torch.autograd.grad(stock.float().sum(), x)

    undo = use_half_saving_group_norm(net)  # not asked for: the half-saving path, the SiLU as it is
    assert "forward" not in vars(net[1])
    assert torch.equal(net(x), stock)
    undo()

    monkeypatch.setenv(TRITON_ENV, "1")
    undo = use_half_saving_group_norm(net)
    assert "forward" in vars(net[1])  # the SiLU passes through: the GroupNorm applies it
    fused = net(x)
    (fused_grad,) = torch.autograd.grad(fused.float().sum(), x)
    torch.testing.assert_close(fused, stock, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fused_grad, stock_grad, atol=2e-2, rtol=2e-2)
    # A standard-layout input takes the half-saving path, SiLU included: the stock numbers exactly.
    assert torch.equal(net(plain), stock_plain)
    undo()
    assert "forward" not in vars(net[0]) and "forward" not in vars(net[1])
