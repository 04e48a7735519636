"""Whether a model-code ``zero_module`` (ldm's or sgm's) still zeroes what it is given: the check
the tests of ``skip_random_init`` make on every module that holds one."""

from __future__ import annotations

import torch


def zeroes(zero_module) -> bool:
    layer = torch.nn.Conv2d(2, 2, 1)
    torch.nn.init.ones_(layer.weight)
    zero_module(layer)
    return bool(layer.weight.eq(0).all())
