"""A ``kohya_config.toml`` + ``kohya_dataset.toml`` pair that reproduces a LoRA Kit run with kohya
sd-scripts' ``train_network.py --config_file kohya_config.toml``, as written.

sd-scripts reads ``--config_file`` into its argument namespace without argparse's conversions or
checks, so every key must be one of ``train_network.py``'s options holding the type argparse would
have produced, and every path must be absolute (sd-scripts runs from its own folder). Options whose
LoRA Kit value means "off" are left out rather than written as 0, because sd-scripts tests several of
them for ``None`` and refuses others (``max_token_length`` takes only 150 or 225; ``constant`` refuses
warmup steps).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit_ext.kohya_options import network_options
from lorakit_ext.optimizer_options import kohya_args, optimizer_kwargs, relative_step
from lorakit_ext.train_config import LORAKIT_LINE

# Stands in for the base model when A1111 trained on a model that came from no file.
MODEL_PLACEHOLDER = "<absolute path of the base checkpoint>"

# The headless sampler's settings (DDIM, 20 steps, CFG 7), as sd-scripts' sample options.
SAMPLE_SAMPLER, SAMPLE_STEPS, SAMPLE_CFG = "ddim", 20, 7.0


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)


def _table(header: str, values: dict) -> str:
    lines = [header] + [f"{k} = {_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def render_train_table(args: dict) -> str:
    """``[train]`` with ``args``; None values are left out."""
    return _table("[train]", args)


def _optimizer_args(config) -> list[str]:
    # As LoRA Kit builds the optimiser; Adafactor's three switches are written out because
    # sd-scripts would otherwise default to relative_step=True.
    return kohya_args(optimizer_kwargs(config))


def _scheduler_args(config, warmup_steps: int) -> dict:
    if relative_step(config):
        # sd-scripts' name for Adafactor's own schedule, with the initial rate after the colon.
        return {"lr_scheduler": f"adafactor:{float(config.unet_lr)}"}
    args = {"lr_scheduler": config.lr_scheduler}
    if config.lr_scheduler != "constant":
        args["lr_warmup_steps"] = int(warmup_steps)
    if config.lr_scheduler == "cosine_with_restarts":
        args["lr_scheduler_num_cycles"] = int(config.lr_scheduler_num_cycles)
    elif config.lr_scheduler == "polynomial":
        # LoRA Kit's "Restarts" field is the polynomial's power there; sd-scripts has its own option.
        args["lr_scheduler_power"] = float(config.lr_scheduler_num_cycles)
    return args


def sample_prompts_text(prompts, seeds, size: tuple[int, int]) -> str:
    """sd-scripts' sample prompt file: one prompt per line with its size, seed, steps and CFG."""
    width, height = size
    return "".join(f"{prompt} --w {width} --h {height} --d {seed} --s {SAMPLE_STEPS} --l {SAMPLE_CFG:g}\n"
                   for prompt, seed in zip(prompts, seeds))


def _sample_args(config, sample_prompts: str | None) -> dict:
    if not sample_prompts:
        return {}
    return {"sample_prompts": str(Path(sample_prompts).resolve()), "sample_sampler": SAMPLE_SAMPLER,
            "sample_every_n_epochs": int(config.sample_every_n_epochs) or None,
            "sample_every_n_steps": int(config.sample_every_n_steps) or None}


def training_args(config, *, base_model_path: str, dataset_config: str, output_dir: str, output_name: str, total_steps: int, warmup_steps: int, v_parameterization: bool, v2: bool, mixed_precision: str, optimizer: str, sample_prompts: str | None = None) -> dict:
    """The ``[train]`` options; ``mixed_precision`` is what the run used: "no", "fp16" or "bf16";
    ``sample_prompts``: the prompt file (:func:`sample_prompts_text`) of a run that draws samples."""
    network_module, network_args = network_options(config)
    args = {
        "pretrained_model_name_or_path": str(Path(base_model_path).resolve()) if base_model_path else MODEL_PLACEHOLDER,
        "v2": True if v2 else None,
        "v_parameterization": True if v_parameterization else None,
        "dataset_config": str(Path(dataset_config).resolve()),
        "output_dir": str(Path(output_dir).resolve()),
        "output_name": output_name,
        "save_model_as": "safetensors",
        "save_precision": "fp16",
        "save_every_n_epochs": int(config.save_every_n_epochs),
        "save_last_n_epochs": int(config.keep_only_last_n_epochs) or None,
        "train_batch_size": int(config.train_batch_size),
        # sd-scripts lets max_train_epochs override max_train_steps, so only one of them is written.
        "max_train_steps": int(total_steps),
        "max_train_epochs": None if config.max_train_steps else int(config.max_train_epochs),
        "seed": int(config.seed),
        "mixed_precision": mixed_precision,
        "sdpa": True,
        "cache_latents": bool(config.cache_latents),
        "cache_latents_to_disk": True if config.cache_latents_to_disk else None,
        "gradient_accumulation_steps": int(config.gradient_accumulation_steps) if config.gradient_accumulation_steps > 1 else None,
        "save_every_n_steps": int(config.save_every_n_steps) or None,
        "cache_text_encoder_outputs": True if config.cache_text_encoder_outputs else None,
        "gradient_checkpointing": bool(config.gradient_checkpointing),
        "clip_skip": int(config.clip_skip),
        "max_token_length": int(config.max_token_length) if config.max_token_length > 75 else None,
        "network_module": network_module,
        "network_dim": int(config.network_dim),
        "network_alpha": float(config.network_alpha),
        "network_args": [f"{key}={value}" for key, value in network_args.items()] or None,
        "network_dropout": float(config.network_dropout) or None,
        "network_weights": str(Path(config.network_weights).resolve()) if config.network_weights else None,
        "network_train_unet_only": True if config.text_encoder_lr == 0 else None,
        # kohya-colab passes the UNet rate as the base rate too; ss_learning_rate records it.
        "learning_rate": float(config.unet_lr),
        "unet_lr": float(config.unet_lr),
        "text_encoder_lr": [float(config.text_encoder_lr)] if config.text_encoder_lr else None,
        "optimizer_type": optimizer,
        "optimizer_args": _optimizer_args(config),
        **_scheduler_args(config, warmup_steps),
        "max_grad_norm": float(config.max_grad_norm),
        "min_snr_gamma": float(config.min_snr_gamma) or None,
        "prior_loss_weight": float(config.prior_loss_weight) if config.reg_folders.strip() else None,
        "noise_offset": float(config.noise_offset) or None,
        "multires_noise_iterations": int(config.multires_noise_iterations) or None,
        "multires_noise_discount": float(config.multires_noise_discount) if config.multires_noise_iterations else None,
        "ip_noise_gamma": float(config.ip_noise_gamma) or None,
        "zero_terminal_snr": True if config.zero_terminal_snr else None,
        "scale_v_pred_loss_like_noise_pred": True if config.scale_v_pred_loss_like_noise_pred else None,
        **_sample_args(config, sample_prompts),
        "training_comment": config.training_comment or None,
        "metadata_trigger_phrase": config.trigger.strip() or None,
    }
    return {k: v for k, v in args.items() if v is not None}


def lorakit_values(config, args: dict) -> dict:
    """The settings that ``args`` and the dataset TOML do not carry as they are (LoRA Kit's own,
    or rounded on the way: the warmup ratio becomes whole steps), so that reading the pair back
    gives ``config`` exactly."""
    from lorakit_ext.kohya_options import epochs_over_steps, flat_dataset

    written = {k: v for k, v in args.items() if k != "sample_prompts"}
    # As load_config_file reads the pair back.
    rebuilt = type(config).from_dict(epochs_over_steps({**written, **flat_dataset(_dataset_tables(config, Path(".")))}))
    values = {k: v for k, v in config.to_dict().items() if getattr(rebuilt, k) != v}
    if "sample_prompts" in args:
        # The prompt file holds what was drawn: the dataset's typical prompt when this is empty.
        values["sample_prompt"] = config.sample_prompt
    return values


def training_toml(config, *, base_model_path: str, script: str = "train_network.py", **kwargs) -> str:
    """``kohya_config.toml``; other keywords as :func:`training_args`. ``base_model_path`` "" (a
    model A1111 had in memory, from no file) leaves a placeholder and says so. ``script`` is the
    sd-scripts script of the model's family. What sd-scripts has no option for
    (:func:`lorakit_values`) goes into a comment line that LoRA Kit reads back
    (:data:`~lorakit_ext.train_config.LORAKIT_LINE`) and sd-scripts never sees."""
    lines = [
        "# Reproduces this LoRA Kit run with kohya sd-scripts. From the sd-scripts folder:",
        f"#   accelerate launch {script} --config_file <this file>",
        "# dataset_config names the dataset TOML written beside this file.",
    ]
    if not base_model_path:
        lines.append(
            "# pretrained_model_name_or_path: the run trained on the model A1111 had loaded, which came "
            "from no file; replace the placeholder with that checkpoint's absolute path."
        )
    args = training_args(config, base_model_path=base_model_path, **kwargs)
    lines.append(LORAKIT_LINE + json.dumps(lorakit_values(config, args), sort_keys=True, ensure_ascii=False))
    return "\n".join(lines) + "\n" + render_train_table(args)


def _dataset_tables(config, dataset_dir: Path, folders=()) -> dict:
    general = {
        "resolution": int(config.resolution),
        "enable_bucket": bool(config.enable_bucket),
        "min_bucket_reso": int(config.min_bucket_reso),
        "max_bucket_reso": int(config.max_bucket_reso),
        "bucket_reso_steps": int(config.bucket_reso_steps),
        "bucket_no_upscale": bool(config.bucket_no_upscale),
        "shuffle_caption": bool(config.shuffle_tags),
        "keep_tokens": int(config.keep_tokens),
        "caption_dropout_rate": float(config.caption_dropout_rate),
        "caption_tag_dropout_rate": float(config.caption_tag_dropout_rate),
        "caption_dropout_every_n_epochs": int(config.caption_dropout_every_n_epochs),
        "flip_aug": bool(config.flip_aug),
        "caption_extension": ".txt",
    }
    subsets = [{"image_dir": str(Path(dataset_dir).resolve()), "num_repeats": int(config.num_repeats)}]
    subsets += [{"image_dir": str(folder.path.resolve()), "num_repeats": int(folder.repeats),
                 "is_reg": True if folder.regularisation else None, "class_tokens": folder.class_tokens or None}
                for folder in folders]
    return {"general": general, "datasets": [{"subsets": subsets}]}


def dataset_toml(config, dataset_dir: Path, folders=()) -> str:
    """``kohya_dataset.toml``: DreamBooth-style subsets, the project's dataset folder itself first,
    then the further training and regularisation ``folders`` (:class:`~lorakit_ext.dataset.folders.ImageFolder`)."""
    tables = _dataset_tables(config, dataset_dir, folders)
    return (
        "# The dataset of the same run; the training TOML names this file as its dataset_config.\n"
        + _table("[general]", tables["general"])
        + "\n[[datasets]]\n"
        + "".join("\n" + _table("[[datasets.subsets]]", subset) for subset in tables["datasets"][0]["subsets"])
    )
