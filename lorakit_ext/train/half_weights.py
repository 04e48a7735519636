"""Half-precision copies of the LoRA weights for the training forward, made once per step.

The network's weights train in fp32. Under autocast each LoRA layer's forward casts its two
weights to half, and backward casts their two gradients back and adds them to the fp32 ``.grad``:
four tiny casts per layer, 768 per step on SD1.5's UNet (864 with its text encoder), which
``bench train --kernel-breakdown`` counts among the casts. Here every such weight lives in one
flat fp32 buffer and has a half view into one flat half buffer:

- at the start of each optimizer step, one cast copies all the weights to half (so whatever
  changed them — the optimizer, a resume, rank 0's broadcast — is picked up);
- the training forward uses the half views, whose gradients add up in one flat half buffer;
- after each backward, one add folds that buffer into the fp32 gradients, which the loss scaler,
  clipping, the gradient sync and the optimizer see as before.

The gradients are the same numbers: backward computes them in half either way, and the fold adds
them to fp32 as autograd's accumulation did. Forwards without gradient (validation, samples) use
the fp32 weights as before.
"""

from __future__ import annotations

import torch
from torch import nn


class HalfWeights:
    """Half views of ``params`` (fp32 leaves on one device) for forwards that compute gradients."""

    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype):
        total, device = sum(p.numel() for p in params), params[0].device
        self.master = torch.empty(total, dtype=torch.float32, device=device)
        self.master_grad = torch.zeros(total, dtype=torch.float32, device=device)
        self.half = torch.empty(total, dtype=dtype, device=device)
        self.half_grad = torch.zeros(total, dtype=dtype, device=device)
        self.of: dict[nn.Parameter, torch.Tensor] = {}
        start = 0
        with torch.no_grad():
            for p in params:
                span = slice(start, start + p.numel())
                start = span.stop
                self.master[span].copy_(p.detach().reshape(-1))
                # The optimizer and every reader of the network see the same Parameter objects, now
                # stored in the flat buffer, with gradients the fold writes into.
                p.data = self.master[span].view_as(p)
                p.grad = self.master_grad[span].view_as(p)
                half = self.half[span].view_as(p).requires_grad_(True)
                half.grad = self.half_grad[span].view_as(p)
                self.of[p] = half
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        self.half.copy_(self.master)

    @torch.no_grad()
    def fold_gradients(self) -> None:
        self.master_grad.add_(self.half_grad)
        self.half_grad.zero_()
