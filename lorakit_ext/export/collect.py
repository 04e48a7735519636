"""peft layers → the modules of a file. A LoRA layer becomes a kohya :class:`ModuleWeights`: peft's
``lora_A`` is kohya's ``lora_down``, ``lora_B`` its ``lora_up``, and both scale the product by
alpha / rank, so export is a renaming. A LoHa or LoKr layer becomes a :class:`ModuleTensors` of the
tensors its type writes (:mod:`lorakit_ext.export.network_types`)."""

from __future__ import annotations

import math
from typing import Callable

from torch import nn

from lorakit_ext.errors import UserError
from lorakit_ext.export.network_types import type_of_layer
from lorakit_ext.export.writer import ModuleTensors, ModuleWeights
from lorakit_ext.models.families.base import ModelFamily


def collect_peft_weights(
    component_root: nn.Module, component: str, family: ModelFamily, alpha_for: Callable[[str], float]
) -> list[ModuleWeights | ModuleTensors]:
    """The weights peft injected under ``component_root`` (``family``'s ``component``), with kohya names.

    ``alpha_for(module_path)`` gives the alpha the layer was created with; it must agree with the
    scale peft applies, or the file would behave differently from the model that was trained.
    """
    modules = []
    for path, layer in component_root.named_modules():
        network_type = type_of_layer(layer)
        adapters = network_type.adapters(layer) if network_type else []
        if not adapters:
            continue
        if len(adapters) != 1:
            raise ValueError(f"{path} carries adapters {adapters}; export expects exactly one")
        adapter = adapters[0]
        if getattr(layer, "use_dora", {}).get(adapter):
            # peft's DoRA normalises per output row, A1111 per input column: the file would differ.
            raise UserError(f"{path} is a DoRA layer; DoRA cannot be saved as a kohya LoRA unmerged")
        alpha = float(alpha_for(path))
        rank = layer.r[adapter]
        if not math.isclose(alpha / rank, layer.scaling[adapter], rel_tol=1e-6):
            raise ValueError(
                f"{path}: peft scales by {layer.scaling[adapter]}, but alpha {alpha} / rank {rank} = {alpha / rank} "
                "(rsLoRA or a changed scale cannot be written in kohya's format)"
            )
        weights = network_type.layer_tensors(layer, adapter)
        modules.append(network_type.record(family.kohya_name(component, path), weights, alpha, rank))
    return modules
