"""The model families LoRA Kit trains, and finding the family of a checkpoint file or a loaded model.

Each family is one module here holding a :class:`~.base.ModelFamily` instance, listed in
:data:`FAMILIES`. Adding a family is that module, its entry there, its label and presets in
:mod:`lorakit_ext.models.family_presets` (which the CLI reads without importing torch) and its tests
(``tests/test_families.py`` checks that every listed family answers the whole seam); when it covers
a kind that :data:`_UNTRAINED` refuses by name, that entry goes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit_ext.errors import UserError
from lorakit_ext.models.families.base import UNET_INPUT_KEY, ModelFamily
from lorakit_ext.models.families.sd1 import SD1
from lorakit_ext.models.families.sd2 import SD2
from lorakit_ext.models.families.sdxl import SDXL
from lorakit_ext.train_config import TrainConfig

FAMILIES: tuple[ModelFamily, ...] = (SD1, SD2, SDXL)


@dataclass(frozen=True)
class _Untrained:
    """A kind of model LoRA Kit knows but has no family for: refused by name, not as an unknown model."""

    label: str
    marks: tuple[str, ...]  # attributes only its loaded model objects have (A1111's is_* flags)


# SD3 files have no UNet, so they are refused as "no Stable Diffusion UNet weights".
_UNTRAINED = (_Untrained("SD3", ("is_sd3",)),)


def trainable(conjunction: str = "or") -> str:
    """The families LoRA Kit trains, for a message: "SD1 or SD2"."""
    labels = [family.label for family in FAMILIES]
    return f"{', '.join(labels[:-1])} {conjunction} {labels[-1]}" if len(labels) > 1 else labels[0]


def family_of(name: str) -> ModelFamily:
    """The family whose :attr:`~.base.ModelFamily.name` is ``name``."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"model family {name!r} is not one of {', '.join(f.name for f in FAMILIES)}")


def detect_family(state_dict: Mapping[str, torch.Tensor], path: Path) -> ModelFamily:
    """The family of a checkpoint to train, from its keys (as :func:`~lorakit_ext.models.checkpoint.read_state_dict`
    gives them); ``UserError`` for anything LoRA Kit cannot train, naming ``path``."""
    family = next((f for f in FAMILIES if f.claims(state_dict)), None)
    if family is not None:
        family.check_file(state_dict, path)
    unet_in = state_dict.get(UNET_INPUT_KEY)
    if unet_in is None:
        raise UserError(
            f"{path.name} has no Stable Diffusion UNet weights (is it a LoRA, VAE or embedding?); "
            f"choose a full {trainable()} checkpoint."
        )
    if unet_in.ndim != 4 or unet_in.shape[1] != 4:
        raise UserError(
            f"{path.name} is an inpainting or instruct-pix2pix model ({unet_in.shape[1]} UNet input channels); "
            f"choose a regular {trainable()} checkpoint."
        )
    if family is None:
        raise UserError(f"{path.name} has no text encoder weights; choose a full {trainable()} checkpoint.")
    return family


def _owner(sd_model: nn.Module) -> ModelFamily | None:
    return next((family for family in FAMILIES if family.owns(sd_model)), None)


def _untrained_kind(sd_model: nn.Module) -> _Untrained | None:
    return next((k for k in _UNTRAINED if any(getattr(sd_model, mark, None) not in (None, False) for mark in k.marks)), None)


def unsupported_model(sd_model: nn.Module) -> str | None:
    """Why a loaded model of a kind LoRA Kit knows but does not train is refused, or None."""
    kind = _untrained_kind(sd_model)
    if kind is not None:
        return f"{kind.label} training is not available; load an {trainable()} checkpoint to train"
    return None


def family_of_model(sd_model: nn.Module) -> ModelFamily:
    """The family of a loaded model object (its names, roots and metadata; whether it trains is
    :func:`unsupported_model`'s); ``UserError`` when no family knows it."""
    if _untrained_kind(sd_model) is not None:
        raise UserError(unsupported_model(sd_model))
    family = _owner(sd_model)
    if family is None:
        raise UserError(
            f"LoRA Kit cannot train this {type(sd_model).__name__}: in-process training needs one of A1111's own "
            f"{trainable()} models (Forge and other backends hold theirs differently)"
        )
    return family


def adapter_for(sd_model: nn.Module, clip_skip: int = 1, max_token_length: int = 225):
    """The :class:`~lorakit_ext.models.base.DiffusionModel` over a loaded model, by its family."""
    return family_of_model(sd_model).adapter(sd_model, clip_skip=clip_skip, max_token_length=max_token_length)


def _preset_labels() -> dict[str, tuple[ModelFamily, str]]:
    """Every family's presets under one name each: SD1's (which SD2 shares) as they are, the others'
    prefixed with their family ("SDXL · Pony")."""
    table: dict[str, tuple[ModelFamily, str]] = {}
    for family in FAMILIES:
        shared = family is not SD1 and family.presets is SD1.presets
        for name in () if shared else family.presets:
            table[name if family is SD1 else f"{family.label} · {name}"] = (family, name)
    return table


# What the forms offer, SD1.5's first: TrainConfig's own defaults are SD1.5's.
PRESETS = _preset_labels()


def preset(label: str, **overrides) -> TrainConfig:
    """The config of one of :data:`PRESETS`: its family's defaults, then the preset's values."""
    if label not in PRESETS:
        raise UserError(f"unknown preset {label!r}; choose one of: {', '.join(PRESETS)}")
    family, name = PRESETS[label]
    return family.train_config(name, **overrides)


def known_family(sd_model: nn.Module | None) -> ModelFamily | None:
    """The family of a loaded model, or None for no model or one no family knows."""
    return _owner(sd_model) if sd_model is not None else None


def family_of_preset(label: str) -> ModelFamily:
    return PRESETS[label][0] if label in PRESETS else SD1


def first_preset(family: ModelFamily | None) -> str:
    """The preset a form starts with for a family's model: its first (SD1's for none)."""
    family = family or SD1
    return next(label for label, (owner, _) in PRESETS.items() if owner is family or (owner is SD1 and family.presets is SD1.presets))


def defaults_of_model(sd_model: nn.Module | None) -> dict:
    """The training defaults of a loaded model's family; SD1.5's (TrainConfig's own) for none or
    a model no family knows."""
    family = _owner(sd_model) if sd_model is not None else None
    return dict(family.defaults) if family is not None else {}
