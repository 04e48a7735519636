"""SD2.x: ldm's ``LatentDiffusion`` with OpenCLIP ViT-H/14 (its penultimate layer); ε-prediction at
512 px or v-prediction at 768 px."""

from __future__ import annotations

import torch
from torch import nn

from lorakit_ext.models.families.names import open_clip_name, open_clip_path
from lorakit_ext.models.families.stable_diffusion import LdmFamily
from lorakit_ext.models.family_presets import SD2_SETTINGS
from lorakit_ext.models.sd_configs import SD2_WIDTHS, sd2_config

class OpenClipText:
    """SD2's text encoder: one 77-token window, the one OpenCLIP's tower was trained on. ldm's
    embedder already conditions on the penultimate layer, so ``clip_skip`` does not apply."""

    def __init__(self, embedder: nn.Module, root: nn.Module):
        self.embedder, self.root = embedder, root

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        import open_clip

        return open_clip.tokenize(captions)[:, None, :]

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedder.encode_with_transformer(ids[:, 0])


class Sd2Family(LdmFamily):
    name = "sd2"
    label = SD2_SETTINGS.label
    sd_version = "SD2"
    base_model_version = "sd_v2"
    v2 = True
    widths = SD2_WIDTHS
    text_key = "cond_stage_model.model."
    text_width_key = "cond_stage_model.model.ln_final.weight"
    embedder_attributes = ("encode_with_transformer", "model")  # ldm's FrozenOpenCLIPEmbedder
    presets = SD2_SETTINGS.presets

    def model_config(self, state_dict) -> dict:
        return sd2_config(v=False)

    def settle_prediction(self, model: nn.Module, from_file: bool) -> None:
        if from_file or not self.predicts_v(model.model.diffusion_model):
            return
        model.parameterization = "v"
        # ldm derives its (unused here) loss weights from the parameterization when it builds the schedule.
        params = self.model_config({})["model"]["params"]
        model.register_schedule(timesteps=params["timesteps"], linear_start=params["linear_start"], linear_end=params["linear_end"])

    def predicts_v(self, unet: nn.Module) -> bool:
        """A1111's test for SD2 checkpoints without a config: at t=999 on a flat input, a v-prediction
        UNet's output sits far below its input, an ε-prediction UNet's does not."""
        param = next(unet.parameters())
        x = torch.full((1, 4, 8, 8), 0.5, device=param.device, dtype=param.dtype)
        context = torch.full((1, 2, self.widths.context_dim), 0.5, device=param.device, dtype=param.dtype)
        t = torch.tensor([999], device=param.device)
        # As A1111 runs it, under autocast: ldm's timestep embedding is fp32 whatever the weights are.
        half = param.dtype in (torch.float16, torch.bfloat16)
        with torch.no_grad(), torch.autocast(param.device.type, dtype=param.dtype, enabled=half):
            return (unet(x, t, context=context).float() - x.float()).mean().item() < -1

    def architecture(self, v: bool) -> str:
        return "stable-diffusion-v2-768-v/lora" if v else "stable-diffusion-v2-512/lora"

    def text_root(self, embedder: nn.Module) -> nn.Module:
        return embedder.model

    def text_encoder(self, embedder: nn.Module, clip_skip: int, max_token_length: int) -> OpenClipText:
        return OpenClipText(embedder, self.text_root(embedder))

    # OpenCLIP keeps q, k and v in the packed in_proj_weight of nn.MultiheadAttention, not in Linear
    # modules: they train in weight space (train.attention_lora) and merge into their third of it.
    def _te_name(self, module_path: str) -> str:
        return open_clip_name(module_path)

    def _te_path(self, name: str) -> str:
        return open_clip_path(name)


SD2 = Sd2Family()
