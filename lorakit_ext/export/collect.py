"""peft LoRA layers → kohya :class:`ModuleWeights`: peft's ``lora_A`` is kohya's ``lora_down``,
``lora_B`` its ``lora_up``, and both scale the product by alpha / rank, so export is a renaming."""

from __future__ import annotations

import math
from typing import Callable

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from lorakit_ext.errors import UserError
from lorakit_ext.export.writer import ModuleWeights
from lorakit_ext.models.families.base import ModelFamily


def _copy(weight: torch.Tensor) -> torch.Tensor:
    # A copy on the CPU: training may go on changing the parameter while the file is written.
    return weight.detach().to("cpu", torch.float32, copy=True)


def collect_peft_weights(
    component_root: nn.Module, component: str, family: ModelFamily, alpha_for: Callable[[str], float]
) -> list[ModuleWeights]:
    """The LoRA weights peft injected under ``component_root`` (``family``'s ``component``), with kohya names.

    ``alpha_for(module_path)`` gives the alpha the layer was created with; it must agree with the
    scale peft applies, or the file would behave differently from the model that was trained.
    """
    modules = []
    for path, layer in component_root.named_modules():
        if not isinstance(layer, LoraLayer) or not layer.lora_A:
            continue
        adapters = list(layer.lora_A.keys())
        if len(adapters) != 1:
            raise ValueError(f"{path} carries adapters {adapters}; export expects exactly one")
        adapter = adapters[0]
        if layer.use_dora.get(adapter):
            # peft's DoRA normalises per output row, A1111 per input column: the file would differ.
            raise UserError(f"{path} is a DoRA layer; DoRA cannot be saved as a kohya LoRA unmerged")
        down, up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        alpha = float(alpha_for(path))
        rank = down.shape[0]
        if not math.isclose(alpha / rank, layer.scaling[adapter], rel_tol=1e-6):
            raise ValueError(
                f"{path}: peft scales by {layer.scaling[adapter]}, but alpha {alpha} / rank {rank} = {alpha / rank} "
                "(rsLoRA or a changed scale cannot be written in kohya's format)"
            )
        modules.append(ModuleWeights(family.kohya_name(component, path), _copy(down), _copy(up), alpha))
    return modules
