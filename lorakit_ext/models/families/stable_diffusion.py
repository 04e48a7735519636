"""What SD1 and SD2 share: ldm's ``LatentDiffusion`` with one text encoder ("te"), the UNet named
the diffusers way. The text encoder itself — HF CLIP or OpenCLIP, its names, widths and config —
and v-prediction are left to :mod:`.sd1` and :mod:`.sd2`."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from lorakit_ext.errors import UserError
from lorakit_ext.models.families.base import UNET_INPUT_KEY, ModelFamily, unet_targets
from lorakit_ext.models.families.names import sd_unet_name, sd_unet_path
from lorakit_ext.models.sd_configs import Widths

_NOT_LDM = ("conditioner.", "model.diffusion_model.label_emb.")


class TextEncoder(Protocol):
    """A family's text encoder inside an ldm model, conditioned on as kohya sd-scripts does."""

    root: nn.Module  # the module its LoRA module paths are relative to

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Captions → token ids ``[B, chunks, tokens]`` on the CPU."""

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids on the model's device → cross-attention conditioning ``[B, T, C]``."""


class LdmFamily(ModelFamily):
    components = {"unet": "lora_unet_", "te": "lora_te_"}
    # sai_model_spec.py: SD1/SD2 LoRAs carry diffusers-style keys, so their implementation is "diffusers".
    modelspec_implementation = "diffusers"
    widths: Widths  # full-size widths: what :meth:`model_config` builds
    text_key: str  # a key prefix only this family's text encoder has in a checkpoint
    text_width_key: str  # a text-encoder weight whose length is the text width
    # Attributes that tell this family's text-encoder holder (ldm's embedder class) from others.
    embedder_attributes: tuple[str, ...]

    # ---- checkpoint files ---------------------------------------------------------------------
    def claims(self, state_dict: Mapping[str, torch.Tensor]) -> bool:
        # sgm's first embedder is renamed to ldm's keys on reading (SD2-turbo has only that one), so
        # any other "conditioner." key left is SDXL's; a UNet with a vector input (label_emb: the
        # SDXL refiner, whose one embedder looks like SD2's) is no text-only SD1/SD2 model either.
        keys = list(state_dict)
        return any(k.startswith(self.text_key) for k in keys) and not any(k.startswith(_NOT_LDM) for k in keys)

    def check_standard_widths(self, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
        # Refused before a full-size model is allocated for a file that would not fit it.
        text = state_dict.get(self.text_width_key)
        found = (state_dict[UNET_INPUT_KEY].shape[0], text.shape[0] if text is not None else None)
        if found != (self.widths.model_channels, self.widths.context_dim):
            raise UserError(
                f"{path.name} has {self.label} keys but not {self.label}'s layer widths "
                f"(UNet {found[0]}, text {found[1]}); put its .yaml config beside it with the same name."
            )

    def import_code(self) -> None:
        from lorakit_ext.models.ldm_import import import_ldm

        import_ldm()

    def build(self, config: dict) -> nn.Module:
        from lorakit_ext.models.ldm_import import build_latent_diffusion

        return build_latent_diffusion(config, init_weights=False)

    def resolution(self, v: bool) -> int:
        # SD2's v-models are its 768-px ones; an ε-model of either family is a 512-px one.
        return 768 if v else 512

    # ---- loaded models ------------------------------------------------------------------------
    def find_embedder(self, cond_stage_model: nn.Module) -> nn.Module | None:
        """This family's text-encoder holder: ldm's ``cond_stage_model`` itself, or the original
        that A1111's wrapper of it keeps as ``.wrapped``; None when it holds another family's."""
        for holder in (cond_stage_model, getattr(cond_stage_model, "wrapped", None)):
            if holder is not None and all(hasattr(holder, name) for name in self.embedder_attributes):
                return holder
        return None

    @abstractmethod
    def text_root(self, embedder: nn.Module) -> nn.Module:
        """The module inside ``embedder`` that text-encoder LoRA paths are relative to."""

    @abstractmethod
    def text_encoder(self, embedder: nn.Module, clip_skip: int, max_token_length: int) -> TextEncoder:
        """The text encoder the adapter conditions with; ``UserError`` for settings it cannot take."""

    def owns(self, sd_model: nn.Module) -> bool:
        # A1111 points an sgm model's cond_stage_model at its only text embedder (the SDXL refiner's
        # OpenCLIP looks like SD2's): a model with sgm's conditioner is never an ldm family's.
        cond = getattr(sd_model, "cond_stage_model", None)
        if hasattr(sd_model, "conditioner") or not hasattr(sd_model, "apply_model") or cond is None:
            return False
        return self.find_embedder(cond) is not None

    def adapter(self, sd_model: nn.Module, clip_skip: int = 1, max_token_length: int = 225):
        # Imported here: models.ldm asks this package for the family of a model it is given bare.
        from lorakit_ext.models.ldm import LdmModel

        return LdmModel(sd_model, clip_skip=clip_skip, max_token_length=max_token_length, family=self)

    def component_roots(self, sd_model: nn.Module) -> dict[str, nn.Module]:
        return {"unet": sd_model.model.diffusion_model, "te": self.text_root(self.find_embedder(sd_model.cond_stage_model))}

    # ---- kohya names --------------------------------------------------------------------------
    @abstractmethod
    def _te_name(self, module_path: str) -> str:
        """The kohya name of a text-encoder module path, without ``lora_te_``."""

    @abstractmethod
    def _te_path(self, name: str) -> str:
        """Inverse of :meth:`_te_name`."""

    def _name_in(self, component: str, module_path: str) -> str:
        return sd_unet_name(module_path) if component == "unet" else self._te_name(module_path)

    def _path_in(self, component: str, name: str) -> str:
        return sd_unet_path(name) if component == "unet" else self._te_path(name)

    def _targets_in(self, component: str, root: nn.Module, network_type: str) -> list[tuple[str, str]]:
        """LoRA: every Linear and 1×1 Conv2d inside the UNet's SpatialTransformers, and the text
        encoder's attention and MLP layers that kohya names. LoCon adds every Linear and Conv2d of
        ResBlocks, Downsamples and Upsamples (3×3 convs train at conv dim/alpha)."""
        if component == "unet":
            return unet_targets(root, network_type)
        return self._text_encoder_targets(component, root)
