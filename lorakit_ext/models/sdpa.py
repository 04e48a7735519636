"""Scaled-dot-product attention for ldm's plain ``CrossAttention`` outside A1111.

A1111 installs its own attention optimisation on the class; headless, ldm's stock forward
materialises the full attention matrix in einsum. We give each such module an SDPA forward for
the duration of a run and take it away afterwards.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from lorakit_ext.models.patching import patch_forwards


def _sdpa_forward(module: nn.Module):
    heads = module.heads

    def forward(x, context=None, mask=None):
        context = x if context is None else context
        q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
        b, n, _ = q.shape
        q, k, v = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        attn_mask = None
        if mask is not None:
            attn_mask = mask.reshape(b, 1, 1, -1).bool()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return module.to_out(out.transpose(1, 2).reshape(b, n, -1))

    return forward


def use_sdpa(unet: nn.Module):
    """Patches stock ldm CrossAttention modules; returns the function that removes the patch."""
    stock = [m for m in unet.modules() if type(m).__name__ == "CrossAttention" and type(m).forward.__module__.startswith("ldm.")]
    return patch_forwards(stock, _sdpa_forward)
