"""The UNet's half LayerNorm on CUDA: autocast's fp32 result rounded once. Needs a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from lorakit_ext.models.layer_norm import use_half_layer_norm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_is_autocasts_fp32_output_rounded_to_half(dtype):
    torch.manual_seed(0)
    norm = torch.nn.Sequential(torch.nn.LayerNorm(640)).cuda().to(dtype).requires_grad_(False)
    with torch.no_grad():
        norm[0].weight.normal_()
        norm[0].bias.normal_()
    x = (torch.randn(2, 1024, 640, device="cuda") * 3 + 1).to(dtype)
    with torch.autocast("cuda", dtype=dtype):
        stock = norm(x)
        use_half_layer_norm(norm)
        ours = norm(x)
    assert stock.dtype == torch.float32 and ours.dtype == dtype
    # At most the one rounding the next Linear would have made: within one half step of stock.
    step = torch.finfo(dtype).eps * stock.abs().clamp(min=torch.finfo(dtype).tiny)
    assert ((ours.float() - stock).abs() <= step).all()
