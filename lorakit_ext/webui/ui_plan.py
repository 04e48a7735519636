"""The Train tab's plan box: kohya-colab's three lines, then the real count after bucketing.

Pure apart from reading image headers. Sizes are cached by (path, size, mtime), so dragging the
Repeats slider over a 200-image dataset re-reads nothing.
"""

from __future__ import annotations

from pathlib import Path

from lorakit_ext.dataset.files import list_images
from lorakit_ext.errors import UserError
from lorakit_ext.train.buckets import bucket_plan_for
from lorakit_ext.train_config import TrainConfig
from lorakit_ext.train.plan import held_out_share, plan_for, split_items

# The fields the plan depends on: a change to any of them redraws the box.
PLAN_FIELDS = (
    "num_repeats",
    "train_batch_size",
    "max_train_epochs",
    "max_train_steps",
    "lr_warmup_ratio",
    "resolution",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "bucket_no_upscale",
    "validation_split",
    "seed",  # which images validation holds out
    "dataset_folders",
    "reg_folders",
    "prior_loss_weight",
)

_sizes: dict[tuple[str, int, int], tuple[int, int]] = {}


def dataset_sizes(dataset: Path) -> list[tuple[int, int]]:
    """Upright sizes of the dataset's images, as the trainer reads them."""
    from lorakit_ext.train.data import image_size

    sizes = []
    for path in list_images(dataset):
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in _sizes:
            _sizes[key] = image_size(path)
        sizes.append(_sizes[key])
    return sizes


def real_counts(config: TrainConfig, sizes: list[tuple[int, int]]) -> str:
    """The trainer's own count (a batch never mixes buckets), in the run record's words."""
    # The trainer's module pulls in peft; loaded on first use so the form builds without it.
    from lorakit_ext.train.preflight import real_schedule

    training, _ = split_items(sizes, held_out_share(config), config.seed)
    buckets = bucket_plan_for(config, training)
    schedule = real_schedule(config, buckets.steps_per_epoch(config.num_repeats, config.train_batch_size))
    used = len(buckets.counts())
    return (
        f"After bucketing ({used} bucket{'' if used == 1 else 's'}): {schedule.steps_per_epoch} steps per epoch, "
        f"{schedule.epochs} epochs, {schedule.total_steps} steps in total, {schedule.warmup_steps} warmup steps."
    )


def _folders_plan(config: TrainConfig, dataset: Path) -> list[str]:
    """With further or regularisation folders: the trainer's own reading of every folder."""
    from lorakit_ext.train.preflight import dataset_schedule

    data = dataset_schedule(config, dataset)
    schedule, used = data.schedule, len(data.buckets.counts())
    return [data.estimate.text,
            f"After bucketing ({used} bucket{'' if used == 1 else 's'}): {schedule.steps_per_epoch} steps per epoch, "
            f"{schedule.epochs} epochs, {schedule.total_steps} steps in total, {schedule.warmup_steps} warmup steps."]


def plan_text(config: TrainConfig, sizes: list[tuple[int, int]], dataset: Path | None = None) -> str:
    """The box's text for the project's images of ``sizes``; ``dataset`` (the project's folder of
    them) is read in full when the config names further or regularisation folders."""
    problems = config.problems()
    if dataset is not None and sizes and not problems and (config.dataset_folders.strip() or config.reg_folders.strip()):
        try:
            return "\n".join(_folders_plan(config, dataset))
        except (UserError, ValueError) as exc:
            return f"Problem: {exc}"
    lines = [plan_for(config, len(sizes)).text]
    if not sizes:
        lines.append("The dataset has no images yet: import some in the Dataset tab.")
    elif not problems:
        try:
            lines.append(real_counts(config, sizes))
        except (UserError, ValueError) as exc:
            lines.append(f"Bucketing fails: {exc}")
    lines += [f"Problem: {p}" for p in problems]
    return "\n".join(lines)
