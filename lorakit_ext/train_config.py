"""``TrainConfig``: the one description of a training run.

The A1111 tab, the HTTP API and the CLI all build this object and call :meth:`TrainConfig.validate`
once. Each field carries its label, help, group, range and choices as metadata, so the tab's form
is generated from it and a new option is one line here. Defaults are the SD1.5 defaults of
kohya-colab's "Lora Trainer" notebook (hollowstrawberry/kohya-colab), which drives kohya sd-scripts;
a model family's own defaults and presets (:mod:`lorakit_ext.models.families`) are values over them.

It sits at the package root, importing nothing of LoRA Kit's floors, so that training, the file
writers (``export``) and the front doors all use it without ``export`` importing ``train``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lorakit_ext.errors import UserError
from lorakit_ext.kohya_options import epochs_over_steps, flat_dataset, ours
from lorakit_ext.optimizer_options import ADAPTIVE, ADAPTIVE_MIN_LR, OPTIMIZERS, parse_optimizer_args

SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")
NETWORK_TYPES = ("LoRA", "LoCon", "LoHa", "LoKr")
PRECISIONS = ("auto", "fp16", "bf16", "no")


def _f(default, label, help, group, *, min=None, max=None, step=None, choices=None, lines=None):
    meta = {"label": label, "help": help, "group": group, "min": min, "max": max, "step": step, "choices": choices, "lines": lines}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    output_name: str = _f("", "Output name", "LoRA file stem; epochs are saved as <name>-01.safetensors … (empty: the project name)", "Output")
    trigger: str = _f("", "Activation tag", "Trigger word(s) put first in every caption and written into the card", "Output")
    sample_every_n_epochs: int = _f(0, "Samples every N epochs", "Draw the sample prompts with the LoRA as trained so far every N epochs (and after the last); 0: never", "Output", min=0, max=1000)
    sample_every_n_steps: int = _f(0, "Samples every N steps", "Also draw them every N optimizer steps, as kohya's sample_every_n_steps (0: never)", "Output", min=0, max=1_000_000)
    sample_prompt: str = _f("", "Sample prompts", "One prompt per line, each drawn at seed + its line number; empty: the trigger and the dataset's most common tags", "Output", lines=2)
    training_comment: str = _f("", "Comment", "Stored in the file's ss_training_comment metadata", "Output")

    resolution: int = _f(512, "Resolution", "Training resolution (square side); buckets keep about this many pixels", "Dataset", min=64, max=2048, step=64)
    enable_bucket: bool = _f(True, "Aspect-ratio buckets", "Train images at their own aspect ratio instead of cropping to a square", "Dataset")
    min_bucket_reso: int = _f(256, "Min bucket side", "Smallest bucket side in pixels", "Dataset", min=64, max=2048, step=64)
    max_bucket_reso: int = _f(1024, "Max bucket side", "Largest bucket side in pixels", "Dataset", min=64, max=4096, step=64)
    bucket_reso_steps: int = _f(64, "Bucket step", "Bucket sides are multiples of this", "Dataset", min=8, max=256, step=8)
    bucket_no_upscale: bool = _f(False, "No upscaling into buckets", "Small images get a bucket no larger than themselves", "Dataset")
    num_repeats: int = _f(10, "Repeats", "How often each image is seen per epoch", "Dataset", min=1, max=1000)
    dataset_folders: str = _f(
        "", "More image folders",
        "Folders trained beside the project's dataset, one per line: '<repeats> <folder>' (e.g. '5 /data/outfits'), a kohya '<repeats>_<name>' folder, or a folder of such folders (kohya's train_data_dir); relative paths are inside the project",
        "Dataset", lines=2)
    reg_folders: str = _f(
        "", "Regularisation folders",
        "Regularisation images, one folder per line as above ('1 reg' is the project's generated ones); kohya balances them to the training images' count",
        "Dataset", lines=2)
    prior_loss_weight: float = _f(1.0, "Prior loss weight", "Loss weight of regularisation images (kohya's prior_loss_weight)", "Dataset", min=0.0, max=10.0, step=0.05)
    flip_aug: bool = _f(False, "Flip augmentation", "Also train on mirrored images (not for asymmetric characters)", "Dataset")
    shuffle_tags: bool = _f(True, "Shuffle tags", "Shuffle caption tags every step, keeping the first `keep tokens` in place", "Dataset")
    keep_tokens: int = _f(1, "Keep tokens", "Leading tags never shuffled (the activation tag)", "Dataset", min=0, max=32)
    caption_dropout_rate: float = _f(0.0, "Caption dropout", "Chance of training a step with an empty caption", "Dataset", min=0.0, max=0.99, step=0.01)
    caption_tag_dropout_rate: float = _f(0.0, "Tag dropout", "Chance of leaving out each tag after the kept ones, every step", "Dataset", min=0.0, max=0.99, step=0.01)
    caption_dropout_every_n_epochs: int = _f(0, "Empty captions every N epochs", "Train every N-th epoch with empty captions (kohya's caption_dropout_every_n_epochs; 0: never)", "Dataset", min=0, max=1000)
    max_token_length: int = _f(225, "Max token length", "Caption tokens used: 75, 150 or 225 (in 75-token chunks)", "Dataset", choices=(75, 150, 225))
    validation_split: float = _f(
        0.1, "Validation share",
        "Share of the images held out of training to measure validation loss each epoch (at least 1; below 20 images none are held out and training images are measured)",
        "Dataset", min=0.0, max=0.5, step=0.05)
    cache_latents: bool = _f(True, "Cache latents", "Encode every image once before training (faster; no per-step VAE)", "Dataset")
    cache_latents_to_disk: bool = _f(False, "Keep latents on disk", "Keep each image's latent in the project's .cache/latents/, so the next run, a resume or another setting skips the VAE for images it has seen at that size", "Dataset")
    cache_text_encoder_outputs: bool = _f(
        False, "Cache text-encoder outputs",
        "Encode every caption once and train the UNet alone, text encoders off the GPU (needs text encoder LR 0, no tag shuffling, no caption dropout)",
        "Dataset")

    max_train_epochs: int = _f(10, "Epochs", "Number of epochs (ignored when Max steps is set)", "Steps", min=1, max=1000)
    max_train_steps: int = _f(0, "Max steps", "Train this many steps instead of counting epochs (0: use epochs)", "Steps", min=0, max=1_000_000)
    train_batch_size: int = _f(2, "Batch size", "Images per step", "Steps", min=1, max=64)
    gradient_accumulation_steps: int = _f(1, "Gradient accumulation", "Batches whose gradients add up to one optimizer step (effective batch = batch size × this); steps, warmup and the schedule count optimizer steps, as kohya's", "Steps", min=1, max=64)
    save_every_n_epochs: int = _f(1, "Save every N epochs", "Write an epoch file every N epochs (the last epoch is always saved)", "Steps", min=1, max=1000)
    validate_every_n_epochs: int = _f(1, "Validate every N epochs", "Measure the validation loss every N epochs (the last epoch always; 0: never)", "Steps", min=0, max=1000)
    save_every_n_steps: int = _f(0, "Save every N steps", "Also write <name>-step00000300.safetensors every N optimizer steps, as kohya's save_every_n_steps (0: only epochs)", "Steps", min=0, max=1_000_000)
    keep_only_last_n_epochs: int = _f(10, "Keep last N epochs", "Delete this run's older epoch files beyond N (0: keep all)", "Steps", min=0, max=1000)

    unet_lr: float = _f(5e-4, "UNet learning rate", "Learning rate of the UNet LoRA", "Learning", min=0.0, max=10.0)
    text_encoder_lr: float = _f(1e-4, "Text encoder learning rate", "0 trains the UNet only", "Learning", min=0.0, max=10.0)
    lr_scheduler: str = _f("cosine_with_restarts", "Scheduler", "Learning-rate schedule", "Learning", choices=SCHEDULERS)
    lr_scheduler_num_cycles: int = _f(3, "Restarts", "Cycles of cosine_with_restarts (power of polynomial)", "Learning", min=1, max=100)
    lr_warmup_ratio: float = _f(0.05, "Warmup ratio", "Share of the steps spent warming up (warmup steps = int(total × ratio))", "Learning", min=0.0, max=0.5, step=0.01)
    min_snr_gamma: float = _f(5.0, "Min-SNR gamma", "Loss weight min(SNR, γ)/SNR; 0 turns it off", "Learning", min=0.0, max=20.0, step=0.5)
    zero_terminal_snr: bool = _f(False, "Zero terminal SNR", "Rescale the noise schedule so its last step is pure noise (v-prediction models trained that way: NoobAI v-pred)", "Learning")
    scale_v_pred_loss_like_noise_pred: bool = _f(False, "Scale v-pred loss like ε", "v-prediction: weight the loss by SNR/(SNR+1), as kohya's scale_v_pred_loss_like_noise_pred", "Learning")
    multires_noise_iterations: int = _f(0, "Multires noise iterations", "kohya's pyramid noise: levels of coarser noise added (6–10 typical; 0: off; not with noise offset; CUDA graphs off)", "Learning", min=0, max=20)
    multires_noise_discount: float = _f(0.3, "Multires noise discount", "Weight of each coarser level (discountⁱ)", "Learning", min=0.0, max=1.0, step=0.05)
    ip_noise_gamma: float = _f(0.0, "Input perturbation γ", "kohya's ip_noise_gamma: noise the latents with noise + γ·randn while the target stays noise (0.1 typical; 0: off)", "Learning", min=0.0, max=1.0, step=0.01)
    noise_offset: float = _f(0.0, "Noise offset", "Adds offset·randn(B,C,1,1) to the noise (darker darks, lighter lights)", "Learning", min=0.0, max=1.0, step=0.01)
    optimizer: str = _f("AdamW8bit", "Optimizer", "AdamW8bit needs bitsandbytes (without it, and where steps replay as CUDA graphs: torch AdamW, said and recorded); Lion, Prodigy and DAdaptAdam their own packages; Prodigy and DAdaptAdam want learning rates near 1.0", "Learning", choices=OPTIMIZERS)
    optimizer_args: str = _f("", "Optimizer arguments", "kohya's optimizer_args: space-separated key=value, e.g. 'decouple=True d_coef=2 use_bias_correction=True safeguard_warmup=True' (Prodigy) or 'relative_step=True scale_parameter=True warmup_init=True' (Adafactor)", "Learning")
    weight_decay: float = _f(0.1, "Weight decay", "Optimizer weight decay", "Learning", min=0.0, max=1.0)
    adam_beta1: float = _f(0.9, "Beta 1", "First moment decay (AdamW, Lion, Prodigy)", "Learning", min=0.0, max=0.9999)
    adam_beta2: float = _f(0.99, "Beta 2", "Second moment decay (AdamW, Lion, Prodigy)", "Learning", min=0.0, max=0.99999)
    max_grad_norm: float = _f(1.0, "Max grad norm", "Gradient clipping (0: off)", "Learning", min=0.0, max=100.0)

    network_type: str = _f("LoRA", "Network", "LoRA: attention and MLP layers; LoCon adds the ResNet/down/upsample convs; LoHa and LoKr (LyCORIS's Hadamard and Kronecker products) train LoCon's modules, written as LyCORIS files A1111 loads", "Network", choices=NETWORK_TYPES)
    network_dim: int = _f(16, "Dim (rank)", "LoRA rank of linear layers", "Network", min=1, max=1024)
    network_alpha: float = _f(8.0, "Alpha", "Scale = alpha / dim", "Network", min=0.0, max=1024.0)
    conv_dim: int = _f(8, "Conv dim", "Rank of the 3×3 convs (LoCon, LoHa, LoKr)", "Network", min=1, max=1024)
    conv_alpha: float = _f(4.0, "Conv alpha", "Scale of the 3×3 convs = conv alpha / conv dim (LoCon, LoHa, LoKr)", "Network", min=0.0, max=1024.0)
    network_weights: str = _f("", "Continue from LoRA", "A kohya-format LoRA file to start from (same network type, dim and alpha); empty: start fresh", "Network")
    network_dropout: float = _f(0.0, "Network dropout", "Dropout on the LoRA down projection's output during training, as kohya's network_dropout", "Network", min=0.0, max=0.99, step=0.01)

    clip_skip: int = _f(2, "Clip skip", "2 for anime models, 1 for photo models", "Model", min=1, max=12)
    mixed_precision: str = _f("auto", "Precision", "auto: bf16 where the GPU supports it, else fp16; fp32 on CPU", "Model", choices=PRECISIONS)
    gradient_checkpointing: bool = _f(False, "Gradient checkpointing", "Less memory, slower steps", "Model")
    cuda_graphs: bool = _f(True, "CUDA graphs", "Replay each bucket's captured training step (several times faster at small batches); off: plain eager steps", "Model")
    seed: int = _f(42, "Seed", "Seed for shuffling, noise and initialisation", "Model", min=0, max=2**32 - 1)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def field_specs(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Builds a config from strings or typed values (forms, JSON, TOML), in LoRA Kit's names or
        kohya sd-scripts' (:mod:`lorakit_ext.kohya_options`); options neither knows are errors."""
        return cls.from_sources(values)

    @classmethod
    def from_sources(cls, *sources: dict) -> "TrainConfig":
        """:meth:`from_dict` over the options of several places (a family's defaults, a preset, a
        config file, the command line), later ones winning. Each is read in LoRA Kit's names
        before they meet, so a kohya name given later (``learning_rate``) overrides what an earlier
        place set under LoRA Kit's (``unet_lr``), and a kohya rule holds inside its own file only."""
        specs = {f.name: f for f in cls.field_specs()}
        values: dict = {}
        for source in sources:
            values.update(ours(source, set(specs)))
        if isinstance(values.get("optimizer_args"), list):
            # kohya's TOML holds them as a list of "key=value" strings.
            values["optimizer_args"] = " ".join(map(str, values["optimizer_args"]))
        kwargs = {name: _coerce(specs[name], value) for name, value in values.items()}
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: Path) -> "TrainConfig":
        return cls.from_dict(load_config_file(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    # ---- validation ---------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every reason this config can't train, as sentences; empty when it is valid."""
        out = []
        for spec in self.field_specs():
            value, meta = getattr(self, spec.name), spec.metadata
            kind = type(spec.default)
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                out.append(f"{spec.name} = {value!r} is not a {kind.__name__}")
                continue
            if kind is float and not math.isfinite(value):
                out.append(f"{spec.name} = {value} is not a finite number")
                continue
            if meta["choices"] and value not in meta["choices"]:
                out.append(f"{spec.name} = {value!r} is not one of {', '.join(map(str, meta['choices']))}")
            if meta["min"] is not None and value < meta["min"]:
                out.append(f"{spec.name} = {value} is below the minimum {meta['min']}")
            if meta["max"] is not None and value > meta["max"]:
                out.append(f"{spec.name} = {value} is above the maximum {meta['max']}")
        if self.unet_lr == 0 and self.text_encoder_lr == 0:
            out.append("unet_lr and text_encoder_lr are both 0: nothing would be trained")
        if self.cache_text_encoder_outputs:
            out += _text_cache_problems(self)
        out += _optimizer_problems(self)
        if self.noise_offset and self.multires_noise_iterations:
            out.append("noise_offset and multires_noise_iterations are alternatives (sd-scripts would apply only the "
                       "offset); set one of them to 0")
        if self.enable_bucket:
            for name in ("resolution", "min_bucket_reso", "max_bucket_reso"):
                if getattr(self, name) % self.bucket_reso_steps:
                    out.append(f"{name} = {getattr(self, name)} is not a multiple of bucket_reso_steps = {self.bucket_reso_steps}")
            if not self.min_bucket_reso <= self.resolution <= self.max_bucket_reso:
                out.append(
                    f"resolution {self.resolution} must lie between min_bucket_reso {self.min_bucket_reso} "
                    f"and max_bucket_reso {self.max_bucket_reso}"
                )
        elif self.resolution % 8:
            out.append(f"resolution = {self.resolution} is not a multiple of 8 (the VAE downsamples by 8)")
        if self.output_name:
            from lorakit_ext.project import validate_name

            try:
                validate_name(self.output_name, "output name")
            except UserError as exc:
                out.append(str(exc))
        return out

    def validate(self) -> "TrainConfig":
        problems = self.problems()
        if problems:
            raise UserError("invalid training settings: " + "; ".join(problems))
        return self


def _optimizer_problems(config: TrainConfig) -> list[str]:
    try:
        parse_optimizer_args(config.optimizer_args)
    except ValueError as exc:
        return [f"optimizer_args: {exc}"]
    if config.optimizer in ADAPTIVE and 0 < max(config.unet_lr, config.text_encoder_lr) < ADAPTIVE_MIN_LR:
        return [f"{config.optimizer} finds its own step size and expects learning rates near 1.0, not "
                f"{max(config.unet_lr, config.text_encoder_lr):g}: set unet_lr (and text_encoder_lr, unless 0) to 1.0"]
    return []


def _text_cache_problems(config: TrainConfig) -> list[str]:
    """Cached text-encoder outputs are right only if every step would encode the same captions with
    the same encoders (kohya refuses the same combinations)."""
    changing = [
        (config.text_encoder_lr > 0, "text_encoder_lr = 0"),
        (config.shuffle_tags, "shuffle_tags off"),
        (config.caption_dropout_rate > 0, "caption_dropout_rate = 0"),
        (config.caption_tag_dropout_rate > 0, "caption_tag_dropout_rate = 0"),
        (config.caption_dropout_every_n_epochs > 0, "caption_dropout_every_n_epochs = 0"),
    ]
    needed = [remedy for on, remedy in changing if on]
    if not needed:
        return []
    return [f"cache_text_encoder_outputs needs frozen text encoders and fixed captions: set {', '.join(needed)}, "
            "or turn the caching off"]


def _coerce(spec: dataclasses.Field, value):
    """``value`` as the field's type. Booleans are not numbers here (JSON ``true`` for a batch size
    is a mistake, not 1), and NaN/infinity are refused for every number."""
    kind = type(spec.default)
    try:
        if isinstance(value, bool) and kind is not bool:
            raise ValueError
        if isinstance(value, kind):
            return _finite(value)
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if kind is int:
            number = _finite(float(value))
            if number != int(number):
                raise ValueError
            return int(number)
        if kind is float:
            return _finite(float(value))
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{spec.name} = {value!r} is not a valid {kind.__name__}") from None


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError
    return value


# A comment line of the kohya TOML LoRA Kit writes: the settings sd-scripts has no option for, as
# JSON. A comment, because sd-scripts reads every key of every table as one of its options.
LORAKIT_LINE = "# lorakit: "


def load_config_file(path: Path) -> dict:
    """Reads a ``.json`` or ``.toml`` file of options. A TOML file's tables are read as one, as
    sd-scripts reads its ``--config_file``, and counts its length as sd-scripts does (epochs over
    steps); the ``dataset_config`` it names, when that file exists, adds its dataset options, and
    LoRA Kit's own line (:data:`LORAKIT_LINE`) comes last."""
    data = _read_table(Path(path))
    if Path(path).suffix.lower() != ".toml":
        return data
    flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for table in (v for v in data.values() if isinstance(v, dict)):
        flat.update(table)
    dataset = flat.get("dataset_config")
    if isinstance(dataset, str) and Path(dataset).is_file():
        flat.update(flat_dataset(_read_table(Path(dataset))))
    flat = epochs_over_steps(flat)
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith(LORAKIT_LINE):
            try:
                flat.update(json.loads(line[len(LORAKIT_LINE):]))
            except ValueError as exc:
                raise UserError(f"config file {path}: its '{LORAKIT_LINE.strip()}' line is not valid JSON ({exc})") from None
    return flat


def _read_table(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = _toml_loads(raw.decode("utf-8")) if path.suffix.lower() == ".toml" else json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a table of options")
    return data


def _toml_loads(text: str) -> dict:
    try:
        import tomllib as toml
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as toml
        except ModuleNotFoundError:
            raise UserError("reading TOML on Python 3.10 needs the 'tomli' package; use a .json config or pip install tomli") from None
    return toml.loads(text)
