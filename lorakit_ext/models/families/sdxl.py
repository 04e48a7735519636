"""SDXL base and its fine-tunes (Pony, Illustrious, NoobAI ε and v-pred, Animagine): sgm's
``DiffusionEngine``, the model A1111 holds as ``shared.sd_model`` when ``is_sdxl``.

Two text encoders sit in ``conditioner.embedders``: 0 is OpenAI's CLIP-L as transformers'
``CLIPTextModel`` (sgm's ``FrozenCLIPEmbedder``), 1 is OpenCLIP bigG (``FrozenOpenCLIPEmbedder2``).
Files are named as kohya sd-scripts' ``sdxl_train_network.py`` writes them: ``lora_unet_`` with the
UNet's own (compvis) names, ``lora_te1_``/``lora_te2_`` with HF CLIP's layer names for both encoders.
The adapter that trains it is :class:`~lorakit_ext.models.sgm.SgmModel`; headless, sgm comes from
:mod:`~lorakit_ext.models.sgm_import`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lorakit_ext.errors import UserError
from lorakit_ext.models.families.base import UNET_INPUT_KEY, ModelFamily, unet_targets
from lorakit_ext.models.families.names import hf_clip_name, hf_clip_path, open_clip_name, open_clip_path, sgm_unet_name, sgm_unet_path
from lorakit_ext.models.families.sd1 import clip_text_transformer
from lorakit_ext.models.family_presets import SDXL_SETTINGS

# A1111's own test for an SDXL base file (modules/sd_models_config.py): bigG as embedder 1.
BASE_TEXT_KEY = "conditioner.embedders.1.model.ln_final.weight"
# The UNet's vector input (``y``): pooled text plus size/crop embeddings.
ADM_KEY = "model.diffusion_model.label_emb.0.0.weight"
# The refiner conditions on bigG alone (embedder 0, which reading renames to SD2's keys) plus an
# aesthetic score: 1280 + 5×256 = 2560 wide where base is 1280 + 6×256 = 2816.
REFINER_ADM = 2560
BASE_WIDTHS = (320, 2816)  # (UNet model_channels, vector width) of SDXL base


def embedder_part(embedder: nn.Module, attribute: str, what: str) -> nn.Module:
    """``attribute`` of sgm's embedder: on the embedder itself, or on the original that A1111's
    wrapper keeps as ``.wrapped``; ``UserError`` when neither has it (not SDXL base's layout)."""
    for holder in (embedder, getattr(embedder, "wrapped", None)):
        if holder is not None and hasattr(holder, attribute):
            return getattr(holder, attribute)
    raise UserError(f"this SDXL model has no {what} where SDXL base has it (is it the refiner?); load an SDXL base-type checkpoint")


class SdxlFamily(ModelFamily):
    name = "sdxl"
    label = SDXL_SETTINGS.label
    sd_version = "SDXL"
    base_model_version = "sdxl_base_v1-0"
    v2 = False
    # sai_model_spec.py gives SDXL LoRAs the generative-models implementation (their keys are sgm's).
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"
    components = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}
    kohya_script = "sdxl_train_network.py"
    defaults = SDXL_SETTINGS.defaults
    presets = SDXL_SETTINGS.presets
    # The denoiser's sigma table is computed from its discretization, never stored in files.
    derived_keys = ("denoiser.",)

    # ---- checkpoint files ---------------------------------------------------------------------
    def claims(self, state_dict: Mapping[str, torch.Tensor]) -> bool:
        adm = state_dict.get(ADM_KEY)
        return BASE_TEXT_KEY in state_dict or (adm is not None and adm.shape[-1] == REFINER_ADM)

    def check_file(self, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
        if BASE_TEXT_KEY not in state_dict:
            raise UserError(
                f"{path.name} is the SDXL refiner, which LoRAs are not trained on; choose an SDXL base-type "
                "checkpoint (SDXL 1.0 base, Pony, Illustrious, NoobAI, Animagine…)."
            )
        unet_in = state_dict.get(UNET_INPUT_KEY)
        if unet_in is not None and unet_in.ndim == 4 and unet_in.shape[1] != 4:
            raise UserError(
                f"{path.name} is an SDXL inpainting model ({unet_in.shape[1]} UNet input channels); choose a regular SDXL checkpoint."
            )

    def check_standard_widths(self, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
        adm = state_dict.get(ADM_KEY)
        found = (state_dict[UNET_INPUT_KEY].shape[0], adm.shape[-1] if adm is not None else None)
        if found != BASE_WIDTHS:
            raise UserError(
                f"{path.name} has SDXL keys but not SDXL's layer widths (UNet {found[0]}, vector {found[1]}); "
                "put its .yaml config beside it with the same name."
            )

    def model_config(self, state_dict) -> dict:
        # NoobAI v-pred and other v-prediction SDXL files carry an empty "v_pred" key (what ComfyUI and
        # Forge go by); A1111 needs a .yaml beside them, which _config_for reads first.
        from lorakit_ext.models.sd_configs import SD1_TEXT_ENCODER_ID, sdxl_config

        return sdxl_config(v="v_pred" in state_dict, clip_l_folder=SD1_TEXT_ENCODER_ID)

    def import_code(self) -> None:
        from lorakit_ext.models.sgm_import import import_sgm

        import_sgm()

    def build(self, config: dict) -> nn.Module:
        from lorakit_ext.models.sgm_import import build_sgm

        return build_sgm(config)

    def settle_prediction(self, model: nn.Module, from_file: bool) -> None:
        from lorakit_ext.models.sgm import parameterization_of

        model.parameterization = parameterization_of(model)

    def resolution(self, v: bool) -> int:
        # ε and v-prediction SDXL models (NoobAI v-pred) alike were trained at about 1024².
        return 1024

    # ---- loaded models ------------------------------------------------------------------------
    def owns(self, sd_model: nn.Module) -> bool:
        # A1111 sets is_sdxl on every model it loads; sgm's conditioner marks one built elsewhere.
        return getattr(sd_model, "is_sdxl", False) is True or hasattr(sd_model, "conditioner")

    def adapter(self, sd_model: nn.Module, clip_skip: int = 1, max_token_length: int = 225):
        # kohya's sdxl_train_network has no clip skip either: SDXL conditions on CLIP-L's layer 11 and
        # bigG's penultimate layer, as it was trained; the forms say so.
        from lorakit_ext.models.sgm import SgmModel

        return SgmModel(sd_model, self, max_token_length=max_token_length)

    def component_roots(self, sd_model: nn.Module) -> dict[str, nn.Module]:
        """The roots A1111's Lora loader names from (networks.py): ``diffusion_model_…``,
        ``0_transformer_text_model_…`` and ``1_model_…``. te1's is CLIP's ``text_model`` level,
        as SD1's, so paths read the same with transformers 4 and 5."""
        embedders = sd_model.conditioner.embedders
        if len(embedders) < 2:
            raise UserError("this SDXL model has one text encoder (is it the refiner?); load an SDXL base-type checkpoint")
        return {
            "unet": sd_model.model.diffusion_model,
            "te1": clip_text_transformer(embedder_part(embedders[0], "transformer", "CLIP-L text encoder (embedder 0)")),
            "te2": embedder_part(embedders[1], "model", "OpenCLIP bigG text encoder (embedder 1)"),
        }

    # ---- kohya names --------------------------------------------------------------------------
    # te2 is OpenCLIP, whose q/k/v are thirds of the packed in_proj_weight, not Linear modules: named
    # as kohya's HF-CLIP bigG names them (A1111 merges them there), trained in weight space.
    def _name_in(self, component: str, module_path: str) -> str:
        return {"unet": sgm_unet_name, "te1": hf_clip_name, "te2": open_clip_name}[component](module_path)

    def _path_in(self, component: str, name: str) -> str:
        return {"unet": sgm_unet_path, "te1": hf_clip_path, "te2": open_clip_path}[component](name)

    def _targets_in(self, component: str, root: nn.Module, network_type: str) -> list[tuple[str, str]]:
        if component == "unet":
            return unet_targets(root, network_type)
        return self._text_encoder_targets(component, root)

    # ---- metadata -----------------------------------------------------------------------------
    def architecture(self, v: bool) -> str:
        # sai_model_spec has one SDXL architecture; a v-prediction LoRA says so by modelspec.prediction_type.
        return "stable-diffusion-xl-v1-base/lora"


SDXL = SdxlFamily()
