"""The headless SDPA forward of ldm's and sgm's CrossAttention: the stock numbers."""

from __future__ import annotations

import torch
from ldm.modules.attention import CrossAttention as LdmCrossAttention
from tiny_sdxl import sgm_dir

from lorakit_ext.models.sdpa import use_sdpa


def _check(attention, **call):
    torch.manual_seed(0)
    x, context = torch.randn(2, 16, 64), torch.randn(2, 7, 32)
    net = torch.nn.Sequential(attention)
    stock = attention(x, context, **call)
    undo = use_sdpa(net)
    patched = "forward" in vars(attention)
    ours = attention(x, context, **call)
    undo()
    assert patched and "forward" not in vars(attention)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)


def test_ldm_attention_with_and_without_a_mask():
    attention = LdmCrossAttention(64, context_dim=32, heads=4, dim_head=16)
    _check(attention)
    _check(attention, mask=torch.tensor([[True] * 5 + [False] * 2, [True] * 7]))


def test_sgm_attention_and_its_video_arguments_left_to_sgm():
    sgm_dir()
    from lorakit_ext.models.sgm_import import import_sgm

    import_sgm()
    from sgm.modules.attention import CrossAttention

    attention = CrossAttention(64, context_dim=32, heads=4, dim_head=16)
    _check(attention)
    _check(attention, additional_tokens=torch.randn(2, 3, 64))
