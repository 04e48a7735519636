"""The metadata kohya sd-scripts writes into a LoRA file: ``ss_*`` training facts and ``modelspec.*``.

Names and value formats follow sd-scripts' ``train_network.py`` and ``library/sai_model_spec.py``,
because A1111, Forge, ComfyUI, civitai and the metadata viewers read them from there: every value is
a string, booleans are ``"True"``/``"False"``, timestamps are Unix seconds (``str(time.time())``),
``ss_resolution`` is a ``"(w, h)"`` tuple, nested values are JSON. A1111 tells SD2 files by
``ss_v2 == "True"``; Forge tells SD1 files only by ``modelspec.architecture``. Those values are the
model family's (:mod:`lorakit_ext.models.families`).
"""

from __future__ import annotations

import datetime
import json

from lorakit_ext.kohya_options import network_options
from lorakit_ext.models.families.base import ModelFamily
from lorakit_ext.train_config import TrainConfig

SAI_MODEL_SPEC_VERSION = "1.0.0"


def _resolution(resolution: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    width, height = resolution
    return int(width), int(height)


def _modelspec_date(timestamp: float) -> str:
    # sai_model_spec drops the microseconds and writes local time in ISO-8601.
    return datetime.datetime.fromtimestamp(int(timestamp)).isoformat()


def training_metadata(
    config: TrainConfig,
    *,
    family: ModelFamily,
    v_parameterization: bool,
    output_name: str,
    epoch: int,
    num_epochs: int,
    steps: int,
    num_train_images: int,
    num_batches_per_epoch: int,
    max_train_steps: int,
    tag_frequency: dict,
    dataset_dirs: dict,
    bucket_info: dict | None,
    base_model_name: str,
    base_model_hash: str | None,
    base_model_sha256: str | None,
    started_at: float,
    finished_at: float,
    resolution: int | tuple[int, int],
    mixed_precision: str,
    num_reg_images: int = 0,
    reg_dataset_dirs: dict | None = None,
    processes: int = 1,
) -> dict[str, str]:
    """Metadata of one epoch file; every value a string.

    ``output_name`` is the file's own stem (A1111 uses ``ss_output_name`` as the alias, and equal
    aliases collide). ``num_train_images`` counts images × repeats, as kohya does.
    ``num_batches_per_epoch`` counts batches (kohya's ``len(train_dataloader)``), ``max_train_steps``
    the run's optimizer steps: they differ by ``gradient_accumulation_steps``.
    ``tag_frequency`` is ``{dir: {tag: count}}``, ``dataset_dirs`` ``{dir: {"n_repeats", "img_count"}}``,
    ``num_reg_images`` and ``reg_dataset_dirs`` the same of the regularisation images (their own
    repeats, before kohya matches them to the training images), ``bucket_info`` kohya's ``{"buckets": …, "mean_img_ar_error": …}`` or None without buckets.
    ``base_model_hash`` is A1111's legacy 8-hex hash, ``base_model_sha256`` the file's sha256.
    ``mixed_precision`` is the precision the run resolved ("no", "fp16" or "bf16"), not the option
    it was asked for ("auto"). ``ss_network_module`` and ``ss_network_args`` are what kohya
    sd-scripts trains the config's network type with (LoHa and LoKr: LyCORIS's ``lycoris.kohya`` and
    its ``algo``; LoCon and those: the conv dim and alpha). ``processes``: data-parallel GPUs.
    """
    width, height = _resolution(resolution)
    network_module, type_args = network_options(config)
    values = {
        "ss_output_name": output_name,
        "ss_training_started_at": float(started_at),
        "ss_training_finished_at": float(finished_at),
        "ss_epoch": epoch,
        "ss_num_epochs": num_epochs,
        "ss_steps": steps,
        "ss_max_train_steps": max_train_steps,
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": num_reg_images,
        "ss_prior_loss_weight": config.prior_loss_weight,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_batch_size_per_device": config.train_batch_size,
        "ss_total_batch_size": config.train_batch_size * processes * config.gradient_accumulation_steps,
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        # kohya-colab passes the UNet rate as the base learning rate.
        "ss_learning_rate": config.unet_lr,
        "ss_unet_lr": config.unet_lr,
        "ss_text_encoder_lr": config.text_encoder_lr,
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": int(max_train_steps * config.lr_warmup_ratio),
        "ss_optimizer": config.optimizer,
        "ss_max_grad_norm": config.max_grad_norm,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
        "ss_network_module": network_module,
        "ss_network_dim": config.network_dim,
        "ss_network_alpha": config.network_alpha,
        "ss_network_dropout": config.network_dropout,
        "ss_network_args": json.dumps({k: str(v) for k, v in type_args.items()}),
        "ss_mixed_precision": mixed_precision,
        "ss_full_fp16": False,
        "ss_v2": family.v2,
        "ss_base_model_version": family.base_model_version,
        "ss_clip_skip": config.clip_skip,
        "ss_max_token_length": config.max_token_length,
        "ss_cache_latents": config.cache_latents,
        "ss_seed": config.seed,
        "ss_noise_offset": config.noise_offset,
        "ss_multires_noise_iterations": config.multires_noise_iterations,
        "ss_multires_noise_discount": config.multires_noise_discount,
        "ss_ip_noise_gamma": config.ip_noise_gamma,
        "ss_min_snr_gamma": config.min_snr_gamma,
        "ss_zero_terminal_snr": config.zero_terminal_snr,
        "ss_scale_v_pred_loss_like_noise_pred": config.scale_v_pred_loss_like_noise_pred,
        "ss_caption_dropout_rate": config.caption_dropout_rate,
        "ss_caption_tag_dropout_rate": config.caption_tag_dropout_rate,
        "ss_caption_dropout_every_n_epochs": config.caption_dropout_every_n_epochs,
        "ss_training_comment": config.training_comment,
        "ss_resolution": (width, height),
        "ss_enable_bucket": config.enable_bucket,
        "ss_min_bucket_reso": config.min_bucket_reso,
        "ss_max_bucket_reso": config.max_bucket_reso,
        "ss_bucket_no_upscale": config.bucket_no_upscale,
        "ss_bucket_info": json.dumps(bucket_info),
        "ss_keep_tokens": config.keep_tokens,
        "ss_shuffle_caption": config.shuffle_tags,
        "ss_flip_aug": config.flip_aug,
        "ss_color_aug": False,
        "ss_random_crop": False,
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dataset_dirs or {}),
        "ss_sd_model_name": base_model_name,
        "ss_sd_model_hash": base_model_hash,
        "ss_new_sd_model_hash": base_model_sha256,
    }
    # kohya leaves the model hashes out when it could not read the model file; so do we.
    metadata = {key: str(value) for key, value in values.items() if value is not None}
    metadata.update(
        {
            "modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION,
            "modelspec.architecture": family.architecture(v_parameterization),
            "modelspec.implementation": family.modelspec_implementation,
            "modelspec.title": output_name,
            "modelspec.resolution": f"{width}x{height}",
            "modelspec.date": _modelspec_date(finished_at),
            "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
        }
    )
    if config.trigger.strip():
        metadata["modelspec.trigger_phrase"] = config.trigger.strip()
    return metadata
