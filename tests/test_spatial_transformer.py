"""ldm's and sgm's SpatialTransformer during training: the stock numbers, in the input's layout,
with no copy at the exit."""

from __future__ import annotations

import pytest
import torch
from copy_count import Copies
from ldm.modules.attention import SpatialTransformer
from tiny_sdxl import sgm_dir

from lorakit_ext.models.layout import relayout_module
from lorakit_ext.models.spatial_transformer import use_layout_keeping_transformers


def _transformer(cls, use_linear: bool, depth: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    net = cls(64, 4, 16, depth=depth, context_dim=32, use_linear=use_linear, use_checkpoint=False)
    with torch.no_grad():
        net.proj_out.weight.normal_(std=0.05)  # ldm and sgm start it at zero, which would hide the branch
    return net


def _run(net, x, context):
    with Copies() as copies:
        out = net(x, context)
        grads = torch.autograd.grad(out, [x, net.proj_out.weight], torch.ones_like(out))
    return out, grads, copies.count


def _compare(net, layout):
    relayout_module(net, layout)
    x = torch.randn(2, 64, 6, 10).contiguous(memory_format=layout).requires_grad_(True)
    context = torch.randn(2, 7, 32)
    stock_out, stock_grads, stock_copies = _run(net, x, context)
    undo = use_layout_keeping_transformers(torch.nn.Sequential(net))
    try:
        assert "forward" in vars(net)
        out, grads, copies = _run(net, x, context)
    finally:
        undo()
    assert "forward" not in vars(net)
    torch.testing.assert_close(out, stock_out, rtol=1e-5, atol=1e-5)
    for ours, stock in zip(grads, stock_grads):
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=layout) and grads[0].is_contiguous(memory_format=layout)
    return stock_copies, copies


@pytest.mark.parametrize("use_linear", [False, True], ids=["conv-sd1", "linear-sd2"])
def test_channels_last_stays_channels_last_without_the_exit_copies(use_linear):
    stock_copies, copies = _compare(_transformer(SpatialTransformer, use_linear), torch.channels_last)
    # The exit's standard-layout copy and the relayout back (by proj_out's convolution, or by the
    # residual add), each forward and backward.
    assert stock_copies - copies >= 2


@pytest.mark.parametrize("use_linear", [False, True], ids=["conv-sd1", "linear-sd2"])
def test_the_standard_layout_runs_as_stock(use_linear):
    stock_copies, copies = _compare(_transformer(SpatialTransformer, use_linear), torch.contiguous_format)
    assert copies == stock_copies


def test_sgm_transformer_with_one_context_for_every_block():
    sgm_dir()
    from lorakit_ext.models.sgm_import import import_sgm

    import_sgm()
    from sgm.modules.attention import SpatialTransformer as SgmSpatialTransformer

    stock_copies, copies = _compare(_transformer(SgmSpatialTransformer, True, depth=2), torch.channels_last)
    assert stock_copies - copies >= 2


def test_a_forward_someone_else_replaced_is_left_alone():
    net = _transformer(SpatialTransformer, False)
    net.forward = lambda x, context=None: x
    undo = use_layout_keeping_transformers(torch.nn.Sequential(net))
    x = torch.randn(1, 64, 2, 2)
    assert torch.equal(net(x), x)
    undo()
    assert "forward" in vars(net)
