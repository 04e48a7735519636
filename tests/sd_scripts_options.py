"""What kohya sd-scripts' ``train_network.py`` accepts, as data: read from its argparse definitions
and its dataset-config schema at commit 48d368f (``train_network.setup_parser`` and the
``library.train_util`` / ``config_util`` / ``custom_train_functions`` / ``sai_model_spec`` /
``deepspeed_utils`` / ``utils`` argument groups it calls).

``--config_file`` values skip argparse (sd-scripts puts them straight into the namespace), so a
value is right only when it already has the type argparse would have produced: a flag is a bool,
``type=float`` a float, ``nargs="*"`` a list.
"""

from __future__ import annotations

FLAG, INT, FLOAT, STR, INT_OR_FLOAT, STRS, FLOATS = "flag", "int", "float", "str", "int or float", "list of str", "list of float"


def _names(kind: str, text: str) -> dict[str, str]:
    return dict.fromkeys(text.split(), kind)


TRAIN_OPTIONS = {
    **_names(FLAG, """
        v2 v_parameterization use_8bit_adam use_lion_optimizer fused_backward_pass save_state_to_huggingface
        resume_from_huggingface async_upload save_state save_state_on_train_end mem_eff_attn torch_compile
        xformers sdpa persistent_data_loader_workers gradient_checkpointing full_fp16 full_bf16 fp8_base
        ddp_gradient_as_bucket_view ddp_static_graph log_config noise_offset_random_strength
        ip_noise_gamma_random_strength zero_terminal_snr lowram highvram sample_at_first output_config
        masked_loss cache_info shuffle_caption enable_wildcard color_aug flip_aug random_crop debug_dataset
        cache_latents cache_latents_to_disk skip_cache_check enable_bucket bucket_no_upscale alpha_mask
        console_log_simple deepspeed zero3_init_flag zero3_save_16bit_model fp16_master_weights_and_gradients
        scale_v_pred_loss_like_noise_pred debiased_estimation_loss weighted_captions cpu_offload_checkpointing
        no_metadata fp8_base_unet network_train_unet_only network_train_text_encoder_only dim_from_weights
        no_half_vae skip_until_initial_step"""),
    **_names(STR, """
        pretrained_model_name_or_path tokenizer_cache_dir optimizer_type lr_scheduler_type lr_scheduler
        output_dir output_name huggingface_repo_id huggingface_repo_type huggingface_path_in_repo
        huggingface_token huggingface_repo_visibility save_precision resume dynamo_backend vae mixed_precision
        logging_dir log_with log_prefix log_tracker_name wandb_run_name log_tracker_config wandb_api_key
        loss_type huber_schedule sample_prompts sample_sampler config_file conditioning_data_dir
        train_data_dir caption_separator caption_extension caption_extention keep_tokens_separator
        secondary_separator caption_prefix caption_suffix face_crop_aug_range resolution resize_interpolation
        dataset_class reg_data_dir in_json console_log_level console_log_file metadata_title metadata_author
        metadata_description metadata_license metadata_tags metadata_usage_hint metadata_thumbnail
        metadata_merged_from metadata_trigger_phrase metadata_preprocessor metadata_is_negative_embedding
        offload_optimizer_device offload_optimizer_nvme_path offload_param_device offload_param_nvme_path
        dataset_config save_model_as network_weights network_module training_comment"""),
    **_names(FLOAT, """
        learning_rate max_grad_norm lr_scheduler_power lr_scheduler_min_lr_ratio noise_offset ip_noise_gamma
        multires_noise_discount adaptive_noise_scale huber_c huber_scale prior_loss_weight token_warmup_step
        caption_dropout_rate caption_tag_dropout_rate min_snr_gamma v_pred_like_loss unet_lr network_alpha
        network_dropout scale_weight_norms validation_split"""),
    **_names(INT, """
        lr_scheduler_num_cycles lr_scheduler_timescale save_every_n_epochs save_every_n_steps
        save_n_epoch_ratio save_last_n_epochs save_last_n_epochs_state save_last_n_steps
        save_last_n_steps_state train_batch_size max_token_length max_train_steps max_train_epochs
        max_data_loader_n_workers seed gradient_accumulation_steps ddp_timeout clip_skip
        multires_noise_iterations min_timestep max_timestep sample_every_n_steps sample_every_n_epochs
        keep_tokens vae_batch_size min_bucket_reso max_bucket_reso bucket_reso_steps token_warmup_min
        caption_dropout_every_n_epochs dataset_repeats zero_stage network_dim initial_epoch initial_step
        validation_seed validate_every_n_steps validate_every_n_epochs max_validation_steps"""),
    **_names(INT_OR_FLOAT, "lr_warmup_steps lr_decay_steps"),
    **_names(STRS, "optimizer_args lr_scheduler_args network_args base_weights"),
    **_names(FLOATS, "text_encoder_lr base_weights_multiplier"),
}

# Options with argparse choices (None, their default, is never written).
TRAIN_CHOICES = {
    "mixed_precision": {"no", "fp16", "bf16"},
    "save_precision": {"float", "fp16", "bf16"},
    "save_model_as": {"ckpt", "pt", "safetensors"},
    "max_token_length": {150, 225},
    "log_with": {"tensorboard", "wandb", "all"},
    "loss_type": {"l1", "l2", "huber", "smooth_l1"},
    "sample_sampler": {"ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
                       "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"},
}

# config_util's ConfigSanitizer as train_network.py builds it (DreamBooth and fine-tuning datasets,
# caption dropout, no ControlNet): keys a subset, a dataset or [general] may hold.
_SUBSET_ASCENDABLE = {
    "color_aug": FLAG, "face_crop_aug_range": "two floats", "flip_aug": FLAG, "num_repeats": INT, "random_crop": FLAG,
    "shuffle_caption": FLAG, "keep_tokens": INT, "keep_tokens_separator": STR, "secondary_separator": STR,
    "caption_separator": STR, "enable_wildcard": FLAG, "token_warmup_min": INT, "token_warmup_step": INT_OR_FLOAT,
    "caption_prefix": STR, "caption_suffix": STR, "custom_attributes": "table", "resize_interpolation": STR,
}
_DROPOUT = {"caption_dropout_every_n_epochs": INT, "caption_dropout_rate": INT_OR_FLOAT, "caption_tag_dropout_rate": INT_OR_FLOAT}
_DREAMBOOTH_ASCENDABLE = {"caption_extension": STR, "class_tokens": STR, "cache_info": FLAG}
_DATASET_ASCENDABLE = {
    "batch_size": INT, "bucket_no_upscale": FLAG, "bucket_reso_steps": INT, "enable_bucket": FLAG, "max_bucket_reso": INT,
    "min_bucket_reso": INT, "validation_seed": INT, "validation_split": FLOAT, "resolution": "int or two ints",
    "network_multiplier": FLOAT, "resize_interpolation": STR,
}
GENERAL_KEYS = {**_DATASET_ASCENDABLE, **_SUBSET_ASCENDABLE, **_DREAMBOOTH_ASCENDABLE, **_DROPOUT}
DATASET_KEYS = dict(GENERAL_KEYS)  # plus "subsets", an array of subset tables
DREAMBOOTH_SUBSET_KEYS = {**_SUBSET_ASCENDABLE, "image_dir": STR, "is_reg": FLAG, "alpha_mask": FLAG, **_DREAMBOOTH_ASCENDABLE, **_DROPOUT}
SUBSET_REQUIRED = {"image_dir"}


def has_type(kind: str, value) -> bool:
    """Whether ``value``, as TOML gives it, is what sd-scripts expects for ``kind``."""
    if kind == FLAG:
        return isinstance(value, bool)
    if kind == INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == FLOAT:
        return isinstance(value, float)
    if kind == STR:
        return isinstance(value, str)
    if kind == INT_OR_FLOAT:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == STRS:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == FLOATS:
        return isinstance(value, list) and all(isinstance(v, float) for v in value)
    if kind == "int or two ints":
        return has_type(INT, value) or (isinstance(value, list) and len(value) == 2 and all(has_type(INT, v) for v in value))
    if kind == "two floats":
        return isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value)
    if kind == "table":
        return isinstance(value, dict)
    raise ValueError(f"unknown kind {kind!r}")
