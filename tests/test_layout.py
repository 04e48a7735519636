"""Conv weights change layout inside their own storage, and change back exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit_ext.models.layout import relayout_, relayout_module


def test_unet_goes_channels_last_in_place_and_back(tiny_sd15):
    unet = tiny_sd15[0].model.diffusion_model
    convs = {n: p for n, p in unet.named_parameters() if p.dim() == 4 and p.shape[-1] > 1}
    before = {n: (p.data_ptr(), p.stride(), p.detach().clone()) for n, p in convs.items()}
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = unet(x, t, ctx)
        undo = relayout_module(unet, torch.channels_last)
        assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs.values())
        # Same storage: no second copy of the weights, and nothing left behind in the allocator.
        assert all(p.data_ptr() == before[n][0] for n, p in convs.items())
        torch.testing.assert_close(unet(x.contiguous(memory_format=torch.channels_last), t, ctx), expected, rtol=1e-5, atol=1e-5)
        undo()
    for name, p in convs.items():
        ptr, stride, values = before[name]
        assert (p.data_ptr(), p.stride()) == (ptr, stride) and torch.equal(p, values)


def test_refuses_a_strided_view():
    w = nn.Conv2d(4, 4, 3).weight.data[:, :2]
    with pytest.raises(ValueError, match="non-dense"):
        relayout_(w, torch.channels_last)
