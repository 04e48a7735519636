"""What every model family answers: the seam between LoRA Kit and SD1, SD2 and the families to come.

Callers hold a family object (``model.family``, ``ModelInfo.family``) and ask it instead of
comparing names; :mod:`lorakit_ext.models.families` lists the families and finds the one of a
checkpoint file or of a loaded model. ``tests/test_families.py`` checks that every listed family
answers all of it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit_ext.errors import UserError
from lorakit_ext.train_config import NETWORK_TYPES, TrainConfig

if TYPE_CHECKING:
    from lorakit_ext.models.base import DiffusionModel

# The UNet's first conv: every Stable Diffusion checkpoint has it, one input channel per latent channel.
UNET_INPUT_KEY = "model.diffusion_model.input_blocks.0.0.weight"
KINDS = ("linear", "conv1x1", "conv3x3")
# A q/k/v/out projection of an ``nn.MultiheadAttention`` (OpenCLIP's text encoders): the attention
# reads these weights directly, so their LoRA trains in weight space (train.attention_lora).
ATTENTION = "attention"
ATTENTION_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj")


def module_kind(module: nn.Module) -> str | None:
    """The LoRA kind of a module: "linear", "conv1x1", "conv3x3" (kohya treats every non-1×1 conv
    alike), or None for modules LoRA does not wrap."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv3x3"
    return None


def modules_in_blocks(root: nn.Module, block_classes: tuple[str, ...], kinds: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(path, kind)`` of every module of one of ``kinds`` inside a block of one of ``block_classes``."""
    # Blocks are matched by class name, not class, so the copy of ldm inside A1111 matches as well
    # (and sgm's UNet, whose blocks have ldm's class names).
    out: dict[str, str] = {}
    for block_path, block in root.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        for child_path, child in block.named_modules():
            kind = module_kind(child)
            if kind in kinds and child_path:
                out[f"{block_path}.{child_path}"] = kind
    return list(out.items())


# kohya's UNet targets (networks/lora.py): LoRA trains the Linear and 1×1 convs of its
# Transformer2DModel (ldm/sgm: SpatialTransformer); with a conv dim, LoCon adds every Linear and
# Conv2d of ResnetBlock2D, Downsample2D and Upsample2D (ResBlock, Downsample, Upsample here).
# LyCORIS's LoHa and LoKr train the same modules as LoCon (its kohya module gives the convs a
# conv dim by default).
_TRANSFORMER = (("SpatialTransformer",), ("linear", "conv1x1"))
_WITH_CONVS = (("SpatialTransformer", "ResBlock", "Downsample", "Upsample"), KINDS)
_UNET_TARGETS = {"LoRA": _TRANSFORMER, "LoCon": _WITH_CONVS, "LoHa": _WITH_CONVS, "LoKr": _WITH_CONVS}


def unet_targets(unet: nn.Module, network_type: str) -> list[tuple[str, str]]:
    """``(path, kind)`` of the modules kohya's ``network_type`` trains in an ldm or sgm UNet."""
    return modules_in_blocks(unet, *_UNET_TARGETS[network_type])


class ModelFamily(ABC):
    """One family of checkpoints LoRA Kit trains; one instance per family. Subclasses set every
    attribute below and implement every abstract method."""

    name: str  # stable id, e.g. "sd1"
    label: str  # how messages name it, e.g. "SD1"
    sd_version: str  # the "sd version" of A1111's card (``export.card.SD_VERSIONS``)
    base_model_version: str  # kohya's ``ss_base_model_version``
    v2: bool  # kohya's ``ss_v2`` and ``--v2``; A1111 tells SD2 LoRAs by ``ss_v2``
    modelspec_implementation: str  # sai_model_spec's ``modelspec.implementation``
    kohya_script: str = "train_network.py"  # the sd-scripts script that trains this family's LoRAs
    components: Mapping[str, str]  # LoRA component ("unet", "te", …) → its kohya name prefix
    # TrainConfig fields whose default differs for this family; TrainConfig's own are SD1.5's.
    defaults: Mapping[str, object] = MappingProxyType({})
    presets: Mapping[str, Mapping[str, object]]  # preset name → TrainConfig fields over the defaults

    def __repr__(self) -> str:
        return f"<model family {self.name}>"

    # ---- checkpoint files ---------------------------------------------------------------------
    @abstractmethod
    def claims(self, state_dict: Mapping[str, torch.Tensor]) -> bool:
        """Whether a checkpoint's keys (in :func:`~lorakit_ext.models.checkpoint.file_layout`) are this family's."""

    def check_file(self, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
        """``UserError`` for a file this family claims but LoRA Kit cannot use (a refiner, an inpainting model)."""

    @abstractmethod
    def check_standard_widths(self, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
        """``UserError`` for a file :meth:`model_config` cannot build: one of other layer widths."""

    @abstractmethod
    def model_config(self, state_dict: Mapping[str, torch.Tensor]) -> dict:
        """The model config of a checkpoint that has no .yaml beside it."""

    @abstractmethod
    def import_code(self) -> None:
        """Imports the family's model classes (seconds on a first import): a run does it with its
        other imports, before :meth:`build`, which would otherwise pay it."""

    @abstractmethod
    def build(self, config: dict) -> nn.Module:
        """The model ``config`` describes, built offline on the CPU in fp32 with its weights left
        uninitialised: the checkpoint's come next."""

    def settle_prediction(self, model: nn.Module, from_file: bool) -> None:
        """Once the weights are in: sets ``model.parameterization`` ("eps" or "v") where the config
        alone did not say it (a file with no .yaml beside it)."""

    # Keys a loaded model has that checkpoints do not carry (computed from the config).
    derived_keys: tuple[str, ...] = ()

    @abstractmethod
    def resolution(self, v: bool) -> int:
        """The image side the family's checkpoints were trained at."""

    # ---- loaded models ------------------------------------------------------------------------
    @abstractmethod
    def owns(self, sd_model: nn.Module) -> bool:
        """Whether a loaded model object (A1111's ``shared.sd_model`` or one we built) is this family's."""

    @abstractmethod
    def adapter(self, sd_model: nn.Module, clip_skip: int = 1, max_token_length: int = 225) -> "DiffusionModel":
        """The :class:`~lorakit_ext.models.base.DiffusionModel` over one of this family's models."""

    @abstractmethod
    def component_roots(self, sd_model: nn.Module) -> dict[str, nn.Module]:
        """Per component, the module its LoRA module paths are relative to."""

    # ---- kohya names --------------------------------------------------------------------------
    @abstractmethod
    def _name_in(self, component: str, module_path: str) -> str:
        """The kohya name of a module path without the component's prefix; ``ValueError`` if none."""

    @abstractmethod
    def _path_in(self, component: str, name: str) -> str:
        """Inverse of :meth:`_name_in`."""

    @abstractmethod
    def _targets_in(self, component: str, root: nn.Module, network_type: str) -> list[tuple[str, str]]:
        """``(path, kind)`` of the modules kohya's ``network_type`` trains under ``root``."""

    def kohya_name(self, component: str, module_path: str) -> str:
        """The kohya module name (no ``.lora_down.weight`` suffix) of ``module_path`` in ``component``,
        relative to :meth:`component_roots`; ``ValueError`` for modules kohya does not name."""
        if component not in self.components:
            raise ValueError(f"component {component!r} is not one of {', '.join(self.components)}")
        return self.components[component] + self._name_in(component, module_path)

    def module_path_from_kohya(self, name: str) -> tuple[str, str]:
        """Inverse of :meth:`kohya_name`: ``(component, module_path)``; ``ValueError`` if unknown."""
        for component, prefix in self.components.items():
            if name.startswith(prefix):
                return component, self._path_in(component, name[len(prefix) :])
        prefixes = " or ".join(f"{prefix}…" for prefix in self.components.values())
        raise ValueError(f"{name!r} is not an {self.label} kohya LoRA module name ({prefixes})")

    def target_modules(self, roots: Mapping[str, nn.Module], network_type: str) -> dict[str, list[tuple[str, str]]]:
        """kohya's targets of ``network_type`` per component given: ``{"unet": [(path, kind)…], …}``."""
        if network_type not in NETWORK_TYPES:
            raise ValueError(f"network type {network_type!r} is not one of {', '.join(NETWORK_TYPES)}")
        unknown = sorted(set(roots) - set(self.components))
        if unknown:
            raise ValueError(f"components {unknown} are not among {self.label}'s: {', '.join(self.components)}")
        targets = {component: self._targets_in(component, root, network_type) for component, root in roots.items()}
        # A target kohya cannot name would be trained and then lost on export: refuse before training.
        for component, entries in targets.items():
            for path, _ in entries:
                try:
                    self.kohya_name(component, path)
                except ValueError as exc:
                    raise UserError(f"this model's layout is not {self.label}'s, so its LoRA could not be saved: {exc}") from None
        return targets

    def _text_encoder_targets(self, component: str, root: nn.Module) -> list[tuple[str, str]]:
        """A text encoder's targets: every Linear under ``root`` that has a kohya name, and the four
        projections of every ``nn.MultiheadAttention`` (OpenCLIP's), kind :data:`ATTENTION`. An
        MHA's ``out_proj`` is one of those four, not a Linear target: the attention reads its
        weight directly, so a wrapper around it would never train."""
        attentions = [path for path, m in root.named_modules() if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None]
        inside_attention = {f"{path}.out_proj" for path in attentions}
        candidates = [(path, "linear") for path, module in root.named_modules()
                      if module_kind(module) == "linear" and path not in inside_attention]
        candidates += [(f"{path}.{leaf}", ATTENTION) for path in attentions for leaf in ATTENTION_LEAVES]
        out = []
        for path, kind in candidates:
            try:
                self.kohya_name(component, path)
            except ValueError:
                continue
            out.append((path, kind))
        return out

    # ---- metadata -----------------------------------------------------------------------------
    @abstractmethod
    def architecture(self, v: bool) -> str:
        """``modelspec.architecture`` of this family's LoRAs, as sai_model_spec names it."""

    # ---- settings -----------------------------------------------------------------------------
    def train_config(self, preset: str | None = None, **overrides) -> TrainConfig:
        """A config of this family's defaults, then ``preset``'s values, then ``overrides``."""
        if preset is not None and preset not in self.presets:
            raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(self.presets)}")
        return TrainConfig(**{**self.defaults, **(self.presets[preset] if preset else {}), **overrides})
