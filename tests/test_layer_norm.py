"""The UNet's LayerNorms under half autocast: the fp32 result in half, no fp32 copies.

On the CPU aten's half kernels round before the affine, so the output is compared within a couple
of half steps of the output's range; tests/gpu checks the CUDA kernels' single rounding."""

from __future__ import annotations

import pytest
import torch
from ldm.modules.attention import BasicTransformerBlock

from lorakit_ext.models.layer_norm import use_half_layer_norm


def _saved_while(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_and_input_gradient_are_the_fp32_ones_rounded_and_only_half_tensors_are_kept(dtype):
    torch.manual_seed(0)
    norm = torch.nn.Sequential(torch.nn.LayerNorm(320))
    with torch.no_grad():
        norm[0].weight.normal_()
        norm[0].bias.normal_()
    norm.requires_grad_(False)  # base weights are frozen in a LoRA run
    x = (torch.randn(2, 64, 320) * 3 + 1).to(dtype).requires_grad_(True)
    g = torch.randn(2, 64, 320).to(dtype)
    # What CUDA autocast computes: everything in fp32; the next Linear rounds the output to half.
    xf = x.detach().float().requires_grad_(True)
    reference = torch.nn.functional.layer_norm(xf, (320,), norm[0].weight.float(), norm[0].bias.float(), 1e-5)
    (reference_grad,) = torch.autograd.grad(reference, xf, g.float())

    undo = use_half_layer_norm(norm)
    with torch.autocast("cpu", dtype=dtype):
        out, saved = _saved_while(lambda: norm(x))
    (grad,) = torch.autograd.grad(out, x, g)
    undo()

    assert "forward" not in vars(norm[0])
    assert out.dtype == dtype and grad.dtype == dtype
    steps = lambda t: 2 * torch.finfo(dtype).eps * t.abs().max()  # noqa: E731  two half steps at the largest value
    assert (out.float() - reference).abs().max() <= steps(reference)
    assert (grad.float() - reference_grad).abs().max() <= steps(reference_grad)
    big = [t for t in saved if t.numel() == x.numel()]
    assert big and all(t.dtype == dtype for t in big), [t.dtype for t in big]


def test_fp32_inputs_use_the_stock_forward():
    norm = torch.nn.Sequential(torch.nn.LayerNorm(8))
    use_half_layer_norm(norm)
    x = torch.randn(3, 8, requires_grad=True)
    assert torch.equal(norm(x), torch.nn.functional.layer_norm(x, (8,), norm[0].weight, norm[0].bias))


def test_an_ldm_transformer_block_gives_the_same_output_and_the_patch_comes_off():
    torch.manual_seed(0)
    block = BasicTransformerBlock(64, 4, 16, context_dim=32).requires_grad_(False)
    x, context = torch.randn(2, 16, 64), torch.randn(2, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock = block(x.bfloat16(), context.bfloat16())
        undo = use_half_layer_norm(block)
        patched = [m for m in block.modules() if "forward" in vars(m)]
        ours = block(x.bfloat16(), context.bfloat16())
    undo()
    assert len(patched) == 3  # norm1, norm2, norm3
    assert not any("forward" in vars(m) for m in block.modules())
    assert torch.allclose(ours.float(), stock.float(), atol=0.05)
