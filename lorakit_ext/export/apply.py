"""Merging a LoRA file into a model's weights, by A1111's rule.

For each module ``W += multiplier · scale · product``, the product being its type's
(:mod:`lorakit_ext.export.network_types`: ``up · down`` for LoRA and LoCon, LoHa's Hadamard and
LoKr's Kronecker product) reshaped to the weight, which covers Linear layers, 1×1 convs (SD1's
proj_in/proj_out) and 3×3 convs; ``scale`` is ``alpha / dim`` where the file has an alpha and the
module a rank, else 1, as in A1111. Files may name q/k/v of OpenCLIP attention (SD2's), which live
as thirds of ``in_proj_weight``; they are merged there, as A1111 does. The model's family resolves
the names. Every key is resolved before any weight changes, so a file that does not fit changes
nothing.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from lorakit_ext.errors import UserError
from lorakit_ext.export.network_types import ALPHA, type_of_keys
from lorakit_ext.export.writer import read_lora_file
from lorakit_ext.models.families.base import ModelFamily
from lorakit_ext.models.families.names import PACKED_QKV

_LISTED = 20


def target_weight(root: nn.Module, path: str) -> tuple[torch.Tensor, slice | None]:
    """The weight a module path names, with its rows for a packed q/k/v; ``LookupError`` if none."""
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return _packed_qkv(root, path)
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise LookupError(path)
    return module.weight, None


def _packed_qkv(root: nn.Module, path: str) -> tuple[torch.Tensor, slice]:
    index = next((i for i, leaf in enumerate(PACKED_QKV) if path.endswith("." + leaf)), None)
    if index is None:
        raise LookupError(path)
    try:
        mha = root.get_submodule(path.rpartition(".")[0])
    except AttributeError:
        raise LookupError(path) from None
    if not isinstance(mha, nn.MultiheadAttention) or not mha._qkv_same_embed_dim:
        raise LookupError(path)
    # nn.MultiheadAttention stacks the q, k and v projections in this order.
    width = mha.embed_dim
    return mha.in_proj_weight, slice(index * width, (index + 1) * width)


def module_delta(parts: dict[str, torch.Tensor], shape: torch.Size, multiplier: float) -> torch.Tensor:
    """What A1111 adds to a weight of ``shape`` for a file module's tensors ``parts`` (of a type
    :func:`~lorakit_ext.export.network_types.type_of_keys` knows) at ``multiplier``; ValueError or
    RuntimeError if they do not make a delta of that shape."""
    tensors = {key: tensor.float() for key, tensor in parts.items() if key != ALPHA}
    network_type = type_of_keys(set(tensors))
    dim = network_type.dim(tensors)
    # No alpha (or no rank) means no scaling, in A1111 and in kohya alike.
    scale = parts[ALPHA].item() / dim if ALPHA in parts and dim else 1.0
    return network_type.product(tensors, shape, scale * multiplier)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" … and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def apply_lora_file(sd_model: nn.Module, path: Path, family: ModelFamily, multiplier: float = 1.0) -> int:
    """Merges the LoRA file at ``path`` into ``sd_model`` (a model of ``family``); returns how many
    modules it merged.

    Raises :class:`UserError`, changing nothing, when a module name matches nothing in the model,
    a module is of no type LoRA Kit merges (DoRA, Tucker convs, IA3…), or its shape does not fit the weight.
    """
    tensors, _ = read_lora_file(path)
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        groups[name][part] = tensor
    roots = family.component_roots(sd_model)
    unknown, problems, merges = [], [], []
    for name, parts in sorted(groups.items()):
        if type_of_keys(set(parts) - {ALPHA}) is None:
            problems.append(f"{name} has {', '.join(sorted(parts))}, not a LoRA, LoHa or LoKr module")
            continue
        try:
            component, module_path = family.module_path_from_kohya(name)
            weight, rows = target_weight(roots[component], module_path)
        except (ValueError, LookupError):
            unknown.append(name)
            continue
        shape = weight[rows].shape if rows is not None else weight.shape
        try:
            delta = module_delta(parts, shape, multiplier)
        except (ValueError, RuntimeError) as exc:  # RuntimeError: factors that do not multiply
            problems.append(f"{name} does not fit the weight {tuple(shape)}: {exc}")
            continue
        merges.append((weight, rows, delta))
    if unknown:
        raise UserError(f"{path}: {len(unknown)} module(s) match nothing in this {family.label} model: {_listing(unknown)}")
    if problems:
        raise UserError(f"{path}: cannot merge: {_listing(problems)}")
    with torch.no_grad():
        for weight, rows, delta in merges:
            target = weight[rows] if rows is not None else weight
            # Sum in fp32 and round once, so an fp16 model loses no more than one rounding.
            target.copy_((target.float() + delta.to(target.device)).to(target.dtype))
    return len(merges)
