"""Each model family's label, training defaults and presets as plain tables, without torch: the CLI
offers and checks presets from here before anything loads a model (``--help`` and ``plan`` stay
light). The families of :mod:`lorakit_ext.models.families` take theirs from here; this module sits
outside that package because importing the package imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FamilySettings:
    """What one family offers as settings; its :class:`~lorakit_ext.models.families.base.ModelFamily` holds the same."""

    label: str  # how messages name the family, e.g. "SD1"
    presets: Mapping[str, Mapping[str, object]]  # preset name → TrainConfig fields over the defaults
    # TrainConfig fields whose default differs for this family; TrainConfig's own are SD1.5's.
    defaults: Mapping[str, object] = field(default_factory=dict)


# kohya-colab's override for its adaptive optimisers ("override_values_for_dadapt_and_prodigy"):
# they find their own step size around a rate of ~1, alpha equal to dim, and Prodigy's recommended
# arguments.
PRODIGY = {
    "optimizer": "Prodigy", "unet_lr": 0.5, "text_encoder_lr": 0.5, "lr_scheduler": "constant_with_warmup",
    "lr_warmup_ratio": 0.05,
    "optimizer_args": "decouple=True weight_decay=0.01 betas=0.9,0.999 d_coef=2 use_bias_correction=True safeguard_warmup=True",
}

# kohya-colab "Lora Trainer"'s SD1.5 settings are TrainConfig's defaults; these are its variants.
KOHYA_COLAB_PRESETS: dict[str, dict] = {
    "kohya-colab (anime)": {},
    "kohya-colab (photo)": {"clip_skip": 1},
    "kohya-colab LoCon": {"network_type": "LoCon"},
    "UNet only": {"text_encoder_lr": 0.0},
    "Low VRAM": {"train_batch_size": 1, "gradient_checkpointing": True},
    "Prodigy": {**PRODIGY, "network_alpha": 16.0},
}

# kohya-colab "XL Lora Trainer" (hollowstrawberry/kohya-colab Lora_Trainer_XL.ipynb): 1024², dim 8 /
# alpha 4 ("Regular LoRA" in its table), UNet 3e-4, text encoders 6e-5, batch 4, min-SNR 8, 2 repeats,
# gradient checkpointing on, buckets up to 4096. It passes no clip skip (kohya's SDXL script has none).
KOHYA_COLAB_XL = {
    "resolution": 1024,
    "max_bucket_reso": 4096,
    "num_repeats": 2,
    "train_batch_size": 4,
    "unet_lr": 3e-4,
    "text_encoder_lr": 6e-5,
    "min_snr_gamma": 8.0,
    "network_dim": 8,
    "network_alpha": 4.0,
    "gradient_checkpointing": True,
    "clip_skip": 1,
}
# The notebook's v-prediction switch (its "NoobAI V-Pred 1.0" model) turns on exactly these.
V_PREDICTION = {"zero_terminal_snr": True, "scale_v_pred_loss_like_noise_pred": True}
KOHYA_COLAB_XL_PRESETS: dict[str, dict] = {
    "kohya-colab XL": {},
    # Its "Style LoCon" row: dim 16 / alpha 8, conv dim 16 / alpha 8.
    "kohya-colab XL LoCon": {"network_type": "LoCon", "network_dim": 16, "network_alpha": 8.0, "conv_dim": 16, "conv_alpha": 8.0},
    # Pony, Illustrious and NoobAI ε train with the notebook's settings as they are: it offers them
    # as models, not as settings. Named here so a user finds the one to pick.
    "Pony": {},
    "Illustrious": {},
    "NoobAI ε": {},
    "NoobAI v-pred": V_PREDICTION,
    "UNet only": {"text_encoder_lr": 0.0},
    # The encoders (1.6 GB in half precision) leave the GPU once every caption is encoded.
    "Low VRAM": {"train_batch_size": 1, "text_encoder_lr": 0.0, "shuffle_tags": False, "cache_text_encoder_outputs": True},
    "Prodigy": {**PRODIGY, "network_alpha": 8.0},
}

SD1_SETTINGS = FamilySettings("SD1", KOHYA_COLAB_PRESETS)
# kohya-colab has no SD2 settings of its own; SD2 trains with SD1.5's.
SD2_SETTINGS = FamilySettings("SD2", KOHYA_COLAB_PRESETS)
SDXL_SETTINGS = FamilySettings("SDXL", KOHYA_COLAB_XL_PRESETS, KOHYA_COLAB_XL)

# One per family of ``FAMILIES``, in its order.
FAMILY_SETTINGS = (SD1_SETTINGS, SD2_SETTINGS, SDXL_SETTINGS)
