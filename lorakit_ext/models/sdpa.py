"""Scaled-dot-product attention for ldm's and sgm's plain ``CrossAttention`` outside A1111.

A1111 installs its own attention optimisation on the class; headless, ldm's stock forward
materialises the full attention matrix in einsum, and sgm's (SDXL's) opens a
``torch.backends.cuda.sdp_kernel`` context around every call, which ``torch.compile`` cannot trace
(each attention would split a compiled block in three). We give each such module an SDPA forward
for the duration of a run and take it away afterwards; sgm's video-only arguments (extra tokens,
cross-frame attention) and masks keep sgm's own forward.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from lorakit_ext.models.patching import patch_forwards


def _sdpa_forward(module: nn.Module):
    heads = module.heads
    sgm = type(module).__module__.startswith("sgm.")
    stock = type(module).forward

    def forward(x, context=None, mask=None, additional_tokens=None, n_times_crossframe_attn_in_self=0):
        if sgm and (mask is not None or additional_tokens is not None or n_times_crossframe_attn_in_self):
            return stock(module, x, context, mask, additional_tokens, n_times_crossframe_attn_in_self)
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
    """Patches stock ldm and sgm CrossAttention modules; returns the function that removes the patch."""
    stock = [m for m in unet.modules()
             if type(m).__name__ == "CrossAttention" and type(m).forward.__module__.startswith(("ldm.", "sgm."))]
    return patch_forwards(stock, _sdpa_forward)
