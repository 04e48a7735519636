"""ldm's GroupNorm32 during training: stock numbers, no fp32 copy of the input kept for backward."""

from __future__ import annotations

import pytest
import torch
from copy_count import Copies
from ldm.modules.diffusionmodules.util import GroupNorm32

from lorakit_ext.models.group_norm import use_half_saving_group_norm


def _run(net, x, g):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
    grads = torch.autograd.grad(out, [x, net[0].weight, net[0].bias], g)
    return out, grads, saved


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last, "strided"])
def test_same_output_and_gradients_bit_for_bit_and_no_fp32_copy_kept(dtype, layout):
    torch.manual_seed(0)
    net = torch.nn.Sequential(GroupNorm32(32, 64))
    with torch.no_grad():
        net[0].weight.normal_()
        net[0].bias.normal_()
    if layout == "strided":  # dense in neither layout, as a permuted activation can be
        x = torch.randn(2, 8, 64, 8, dtype=dtype).permute(0, 2, 1, 3).requires_grad_(True)
        layout = torch.contiguous_format
    else:
        x = torch.randn(2, 64, 8, 8, dtype=dtype).contiguous(memory_format=layout).requires_grad_(True)
    g = torch.randn(2, 64, 8, 8, dtype=dtype)
    stock_out, stock_grads, stock_saved = _run(net, x, g)
    undo = use_half_saving_group_norm(net)
    out, grads, saved = _run(net, x, g)
    undo()
    assert "forward" not in vars(net[0])
    assert torch.equal(out, stock_out) and out.dtype == dtype
    assert out.is_contiguous(memory_format=layout) or not x.is_contiguous(memory_format=layout)
    assert all(torch.equal(a, b) for a, b in zip(grads, stock_grads))
    big = lambda tensors: [t for t in tensors if t.numel() == x.numel()]  # noqa: E731
    assert [t.dtype for t in big(stock_saved)] == [torch.float32], "ldm keeps an fp32 copy of the input"
    assert [t.dtype for t in big(saved)] == [dtype] and big(saved)[0].data_ptr() == x.data_ptr()


def test_fp32_inputs_and_inference_use_the_stock_forward():
    net = torch.nn.Sequential(GroupNorm32(32, 64))
    use_half_saving_group_norm(net)
    x = torch.randn(1, 64, 4, 4)
    assert net(x).grad_fn.name() != "_GroupNormFromHalfBackward"
    with torch.no_grad():
        assert torch.equal(net(x.bfloat16()), GroupNorm32.forward(net[0], x.bfloat16()))


def test_with_cudas_kernel_layout_a_channels_last_activation_stays_channels_last_in_one_copy_each_way(monkeypatch):
    from lorakit_ext.models import group_norm

    # On CUDA aten's GroupNorm takes the standard layout only; the same rule on the CPU here.
    monkeypatch.setattr(group_norm, "_layout", lambda x: torch.contiguous_format)
    torch.manual_seed(0)
    net = torch.nn.Sequential(GroupNorm32(32, 64))
    x = torch.randn(2, 64, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    g = torch.randn(2, 64, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    # The reference runs on the standard layout too: the CPU's channels_last kernel sums in another order.
    standard = x.detach().contiguous().requires_grad_(True)
    stock_out, stock_grads, _ = _run(net, standard, g.contiguous())
    undo = use_half_saving_group_norm(net)
    try:
        with Copies() as copies:
            out, grads, _ = _run(net, x, g)
    finally:
        undo()
    assert torch.equal(out, stock_out) and all(torch.equal(a, b) for a, b in zip(grads, stock_grads))
    # The next convolution (channels_last weights) and the gradient's path back take them as they are.
    assert out.is_contiguous(memory_format=torch.channels_last) and grads[0].is_contiguous(memory_format=torch.channels_last)
    # Input to fp32, output to half; incoming gradient and saved input to fp32, input gradient to
    # half (the fp32 weight and bias gradients are the fp32 parameters' already).
    assert copies.count == 2 + 3
