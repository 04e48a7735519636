"""A ``kohya_config.toml`` + dataset TOML pair that reproduces a LoRA Kit run with sd-scripts'
``train_network.py --config_file … --dataset_config …``."""

from __future__ import annotations

import json
from pathlib import Path

# TrainConfig fields whose kohya argument has the same name and meaning.
_SAME_NAME = (
    "max_train_epochs", "train_batch_size", "save_every_n_epochs", "unet_lr", "text_encoder_lr",
    "lr_scheduler", "lr_scheduler_num_cycles", "min_snr_gamma", "noise_offset", "network_dim",
    "network_alpha", "max_grad_norm", "clip_skip", "max_token_length", "seed", "keep_tokens",
    "caption_dropout_rate", "gradient_checkpointing", "training_comment",
)


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)


def _table(name: str, values: dict) -> str:
    lines = [f"[{name}]"] + [f"{k} = {_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def training_toml(config, *, base_model: str, output_dir: str, output_name: str, total_steps: int, warmup_steps: int, v_parameterization: bool, v2: bool, mixed_precision: str, optimizer: str) -> str:
    args = {k: getattr(config, k) for k in _SAME_NAME}
    if not config.max_train_steps:
        args.pop("max_train_epochs")
        args["max_train_epochs"] = config.max_train_epochs
    else:
        args["max_train_steps"] = config.max_train_steps
    if config.text_encoder_lr == 0:
        args["network_train_unet_only"] = True
    if config.network_type == "LoCon":
        args["network_args"] = [f"conv_dim={config.conv_dim}", f"conv_alpha={config.conv_alpha}"]
    if config.network_dropout:
        args["network_dropout"] = config.network_dropout
    args["training_comment"] = config.training_comment or None
    args.update(
        pretrained_model_name_or_path=base_model,
        output_dir=output_dir,
        output_name=output_name,
        save_model_as="safetensors",
        save_precision="fp16",
        network_module="networks.lora",
        optimizer_type=optimizer,
        optimizer_args=[f"weight_decay={config.weight_decay}", f"betas=[{config.adam_beta1},{config.adam_beta2}]"],
        lr_warmup_steps=warmup_steps,
        max_train_steps=total_steps,
        mixed_precision=mixed_precision,
        sdpa=True,
        cache_latents=config.cache_latents,
        v2=v2 or None,
        v_parameterization=v_parameterization or None,
        save_last_n_epochs=config.keep_only_last_n_epochs or None,
    )
    return "# Reproduces this LoRA Kit run with kohya sd-scripts (train_network.py --config_file).\n" + _table("train", args)


def dataset_toml(config, dataset_dir: Path) -> str:
    general = {
        "resolution": config.resolution,
        "enable_bucket": config.enable_bucket,
        "min_bucket_reso": config.min_bucket_reso,
        "max_bucket_reso": config.max_bucket_reso,
        "bucket_reso_steps": config.bucket_reso_steps,
        "bucket_no_upscale": config.bucket_no_upscale,
        "shuffle_caption": config.shuffle_tags,
        "keep_tokens": config.keep_tokens,
        "flip_aug": config.flip_aug,
        "caption_extension": ".txt",
    }
    subset = {"image_dir": str(dataset_dir), "num_repeats": config.num_repeats}
    return (
        "# Dataset for the same run (train_network.py --dataset_config).\n"
        + _table("general", general)
        + "\n[[datasets]]\n\n"
        + _table("[datasets.subsets]", subset)
    )
