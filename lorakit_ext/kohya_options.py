"""kohya sd-scripts' option names, read as ``TrainConfig`` fields.

A kohya user's ``--config_file`` TOML (``[train]``-style tables, optionally beside the
``--dataset_config`` TOML it names) comes in as it is: every option LoRA Kit has is mapped to its
field (the table below), options that change nothing here are accepted and listed in
:data:`NO_EFFECT`, and every other option is refused by name — training without something the user
asked for would be a silent difference.

Pure: no torch; :mod:`lorakit_ext.train_config` calls :func:`ours` for any key that is not a field.
"""

from __future__ import annotations

import re
from pathlib import Path

from lorakit_ext.errors import UserError
from lorakit_ext.optimizer_options import OPTIMIZERS, parse_optimizer_args

# kohya option → LoRA Kit field, where the names differ.
RENAMED = {
    "reg_data_dir": "reg_folders",
    "train_data_dir": "dataset_folders",
    "save_last_n_epochs": "keep_only_last_n_epochs",
    "optimizer_type": "optimizer",
    "shuffle_caption": "shuffle_tags",
    "metadata_trigger_phrase": "trigger",
    "batch_size": "train_batch_size",
}
# Options that LoRA Kit decides itself or that only say where things are: accepted, no effect.
NO_EFFECT = {
    "pretrained_model_name_or_path": "the base model is --base-model (or A1111's loaded model)",
    "dataset_config": "its dataset options are read with the training file",
    "output_dir": "epoch files go to --out (or A1111's Lora folder)",
    "logging_dir": "LoRA Kit keeps loss.csv in the run folder",
    "save_model_as": "always safetensors",
    "save_precision": "always fp16",
    "sdpa": "always PyTorch SDPA", "xformers": "always PyTorch SDPA", "mem_eff_attn": "always PyTorch SDPA",
    "caption_extension": "captions are the .txt beside each image",
    "v2": "read from the model", "v_parameterization": "read from the model",
    "no_half_vae": "the VAE encodes in fp32 where fp16 would overflow",
    "persistent_data_loader_workers": "no data loader workers", "max_data_loader_n_workers": "no data loader workers",
    "lowram": "the model is loaded once", "highvram": "the model is loaded once",
    "image_dir": "the dataset is the project's dataset folder",
    "class_tokens": "images without a caption file take their kohya folder name's words",
    "learning_rate": "read as unet_lr (and text_encoder_lr) when those are not given",
    "network_train_unet_only": "read as text_encoder_lr = 0",
    "network_module": "read as network_type", "network_args": "read as network_type and conv_dim/conv_alpha",
    "lr_warmup_steps": "read as lr_warmup_ratio", "lr_scheduler_power": "read as the polynomial's power",
    "sample_prompts": "its prompts are read as sample_prompt; each is drawn at the training resolution and seed + its line number",
    "sample_sampler": "samples are drawn with DDIM headless and with A1111's sampler in the tab",
}
# How kohya sd-scripts trains each network type: ``(network_module, algo, whether conv_dim and
# conv_alpha apply)``. LoCon is networks.lora with a conv dim; LoHa and LoKr are LyCORIS's
# algorithms through its kohya module (which reads LoCon's algo too).
KOHYA_NETWORKS = {
    "LoRA": ("networks.lora", None, False),
    "LoCon": ("networks.lora", None, True),
    "LoHa": ("lycoris.kohya", "loha", True),
    "LoKr": ("lycoris.kohya", "lokr", True),
}
_LYCORIS = "lycoris.kohya"


def network_options(config) -> tuple[str, dict[str, str]]:
    """``(network_module, network_args)`` with which kohya sd-scripts trains ``config``'s network type."""
    module, algo, convs = KOHYA_NETWORKS[config.network_type]
    args = {"algo": algo} if algo else {}
    if convs:
        args.update(conv_dim=str(int(config.conv_dim)), conv_alpha=str(float(config.conv_alpha)))
    return module, args


def _single_rate(value) -> float:
    rates = value if isinstance(value, list) else [value]
    if len(set(rates)) > 1:
        raise UserError(f"text_encoder_lr = {value}: separate rates for two text encoders are not supported; give one")
    return float(rates[0])


def _network(values: dict, out: dict) -> None:
    module = values.get("network_module", "networks.lora")
    if module not in {module for module, _, _ in KOHYA_NETWORKS.values()}:
        raise UserError(f"network_module = {module!r} is not supported; LoRA Kit trains networks.lora (LoRA, LoCon) "
                        f"and {_LYCORIS} (LoHa, LoKr)")
    args = dict(arg.split("=", 1) for arg in values.get("network_args", []) if "=" in arg)
    if str(args.get("dora_wd", "")).lower() == "true":
        raise UserError("network_args dora_wd=True (DoRA) is refused: peft and LyCORIS (by default) normalise DoRA's magnitude per "
                        "output row, A1111 1.10 applies it per input column, so the file would not draw what was "
                        "trained; train LoRA, LoCon, LoHa or LoKr")
    unsupported = sorted(set(args) - {"conv_dim", "conv_alpha", "algo"})
    if unsupported:
        raise UserError(f"network_args {', '.join(unsupported)} are not supported (LoRA Kit reads algo, conv_dim, conv_alpha)")
    algo = args.get("algo", "locon" if "conv_dim" in args else "lora")
    lycoris = {algo: network_type for network_type, (_, algo, _) in KOHYA_NETWORKS.items() if algo}
    if algo in ("lora", "locon"):
        out["network_type"] = "LoCon" if algo == "locon" or "conv_dim" in args else "LoRA"
    elif algo in lycoris and module == _LYCORIS:
        out["network_type"] = lycoris[algo]
        # LyCORIS's kohya module gives the convs the network's dim and alpha unless told otherwise.
        for key, default in (("conv_dim", "network_dim"), ("conv_alpha", "network_alpha")):
            if key not in args and default in values:
                out[key] = values[default]
    else:
        raise UserError(f"network_args algo={algo} is not supported with {module}; LoRA Kit trains lora and locon, "
                        f"and {', '.join(lycoris)} with network_module = {_LYCORIS}")
    for key in ("conv_dim", "conv_alpha"):
        if key in args:
            out[key] = float(args[key]) if key == "conv_alpha" else int(args[key])


def _optimizer(values: dict, out: dict) -> None:
    args = parse_optimizer_args(" ".join(values.get("optimizer_args", [])))
    if "weight_decay" in args:
        out["weight_decay"] = float(args.pop("weight_decay"))
    betas = args.get("betas")
    if isinstance(betas, (tuple, list)) and len(betas) == 2:
        out["adam_beta1"], out["adam_beta2"] = map(float, args.pop("betas"))
    if str(out.get("optimizer", values.get("optimizer_type", ""))).lower() == "adafactor":
        # LoRA Kit's Adafactor default (a fixed rate) needs no arguments to say so.
        for key in ("scale_parameter", "relative_step", "warmup_init"):
            if args.get(key) is False:
                args.pop(key)
    out["optimizer_args"] = " ".join(f"{k}={_arg_text(v)}" for k, v in args.items())


def _arg_text(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(repr, value))
    return value if isinstance(value, str) else repr(value)


def ours(values: dict, fields: set[str]) -> dict:
    """``values`` (kohya names or ours; ours win) as LoRA Kit fields. :class:`UserError` names every
    option that is neither a field, a kohya option LoRA Kit reads, nor one without effect here."""
    unknown = sorted(k for k in values if k not in fields and k not in RENAMED and k not in NO_EFFECT)
    if unknown:
        raise UserError(f"training option(s) LoRA Kit does not support: {', '.join(unknown)}; remove them "
                        "(the README lists what a kohya config may hold)")
    out = {RENAMED[k]: v for k, v in values.items() if k in RENAMED}
    out.update({k: v for k, v in values.items() if k in fields})
    if "optimizer" in out:
        known = {name.lower(): name for name in OPTIMIZERS}
        out["optimizer"] = known.get(str(out["optimizer"]).lower(), out["optimizer"])
    if "learning_rate" in values:
        out.setdefault("unet_lr", values["learning_rate"])
        out.setdefault("text_encoder_lr", values["learning_rate"])
    if "text_encoder_lr" in out:
        out["text_encoder_lr"] = _single_rate(out["text_encoder_lr"])
    if values.get("network_train_unet_only"):
        out["text_encoder_lr"] = 0.0
    if "network_module" in values or "network_args" in values:
        _network(values, out)
    if "optimizer_args" in values and isinstance(values["optimizer_args"], list):
        _optimizer(values, out)
    if isinstance(out.get("lr_scheduler"), str) and out["lr_scheduler"].startswith("adafactor"):
        out["lr_scheduler"] = "constant"  # Adafactor's own schedule, chosen by relative_step
    if "max_token_length" in values and values["max_token_length"] is None:
        out["max_token_length"] = 75
    if "resolution" in out:
        out["resolution"] = _square(out["resolution"])
    if values.get("sample_prompts") and "sample_prompt" not in out:
        out["sample_prompt"] = _prompts_in_file(Path(values["sample_prompts"]))
    _steps(values, out)
    return out


def _prompts_in_file(path: Path) -> str:
    """The prompts of sd-scripts' text prompt file: a prompt per line, its own options after " --"."""
    if path.suffix.lower() != ".txt":
        raise UserError(f"sample_prompts = {str(path)!r}: LoRA Kit reads the .txt prompt file (one prompt per line); "
                        "put the prompts in one, or give sample_prompt")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"sample_prompts = {str(path)!r} could not be read ({exc}); give the prompt file's absolute path") from None
    prompts = [line.split(" --")[0].strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return "\n".join(p for p in prompts if p)


def _steps(values: dict, out: dict) -> None:
    """A warmup given in steps, as the share of the steps LoRA Kit counts it in."""
    if "lr_scheduler_power" in values:
        out.setdefault("lr_scheduler_num_cycles", int(values["lr_scheduler_power"]))
    warmup = values.get("lr_warmup_steps")
    if warmup is None or "lr_warmup_ratio" in values:
        return
    total = values.get("max_train_steps")
    if 0 <= warmup < 1:
        out["lr_warmup_ratio"] = float(warmup)  # sd-scripts reads a value below 1 as a ratio
    elif total:
        out["lr_warmup_ratio"] = float(warmup) / float(total)
    else:
        raise UserError(f"lr_warmup_steps = {warmup} needs max_train_steps to become a ratio; give lr_warmup_ratio instead")


def epochs_over_steps(values: dict) -> dict:
    """An sd-scripts config's options as sd-scripts counts its length: ``max_train_epochs``, when
    given, overrides ``max_train_steps`` (a warmup in steps still counts against the steps written).
    Only for kohya's files: in LoRA Kit's own options a number of steps wins over the epochs."""
    if not values.get("max_train_epochs") or not values.get("max_train_steps"):
        return values
    out = dict(values)
    _steps(values, out)
    out.pop("lr_warmup_steps", None)
    out["max_train_steps"] = 0
    return out


def _square(value):
    """kohya's resolution: ``512``, ``"512,512"`` or ``[512, 512]``; LoRA Kit trains square sides."""
    sides = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        numbers = {int(str(side).strip()) for side in sides}
    except ValueError:
        return value  # left for the field's own check to name
    if len(numbers) != 1:
        raise UserError(f"resolution = {value!r}: LoRA Kit trains a square resolution (buckets keep each image's shape); give one side")
    return numbers.pop()


# What a further subset of a dataset TOML may hold: LoRA Kit's dataset options apply to every folder.
_SUBSET_KEYS = {"image_dir", "num_repeats", "is_reg"}


def _folder_line(subset: dict, first: dict) -> str:
    # A kohya-named folder ("5_alice") captions its uncaptioned images with its name's words itself.
    named = re.match(r"^\d+_(.*)$", Path(str(subset.get("image_dir", ""))).name)
    own = {"class_tokens": named.group(1).replace("_", " ").strip()} if named else {}
    different = sorted(k for k, v in subset.items() if k not in _SUBSET_KEYS and first.get(k) != v and own.get(k) != v)
    if different:
        raise UserError(f"the dataset config's subset {subset.get('image_dir', '?')} sets {', '.join(different)} of its own; "
                        "LoRA Kit applies one set of dataset options to every folder (caption images with .txt files "
                        "instead of class_tokens); remove them or make them the same as the first subset's")
    if "image_dir" not in subset:
        raise UserError("a subset of the dataset config has no image_dir; give each subset its folder")
    return f"{int(subset.get('num_repeats', 1))} {subset['image_dir']}"


def flat_dataset(dataset: dict) -> dict:
    """The options of a kohya dataset TOML (``[general]``, ``[[datasets]]`` and their
    ``[[datasets.subsets]]``) in one table: the first training subset is the project's dataset
    (its options are the run's); every other one becomes a line of ``dataset_folders``, each
    regularisation subset (``is_reg``) one of ``reg_folders``. Several ``[[datasets]]`` (kohya's
    separate resolutions) are refused."""
    datasets = dataset.get("datasets", [])
    if len(datasets) > 1:
        raise UserError("the dataset config has several [[datasets]] tables, which LoRA Kit does not support; "
                        "put every folder in one as subsets")
    first_set = datasets[0] if datasets else {}
    subsets = first_set.get("subsets", [])
    training = [subset for subset in subsets if not subset.get("is_reg")]
    first = training[0] if training else {}
    out = {**dataset.get("general", {}), **{k: v for k, v in first_set.items() if k != "subsets"},
           **{k: v for k, v in first.items() if k != "is_reg"}}
    more = [_folder_line(subset, first) for subset in training[1:]]
    reg = [_folder_line(subset, first) for subset in subsets if subset.get("is_reg")]
    if more:
        out["dataset_folders"] = "\n".join(more)
    if reg:
        out["reg_folders"] = "\n".join(reg)
    return out
