"""The training plan shown before training, in the words kohya-colab's Lora Trainer prints it.

Pure arithmetic: the trainer reports the real number of steps after bucketing next to it.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import asdict, dataclass, field
from typing import Sequence

from lorakit_ext.dataset.folders import balance_reg_repeats

# The notebook aborts above this; we warn, because a long run can be deliberate.
STEP_WARNING = 10_000
# kohya-colab's advice: images × repeats per epoch in this range trains a character well.
IMAGE_STEPS_HINT = (200, 400)
# Below this many images every one of them is needed for training; validation then measures
# training images (with fixed noise), at most MAX_VALIDATION_IMAGES of them.
MIN_IMAGES_TO_HOLD_OUT = 20
MAX_VALIDATION_IMAGES = 16


@dataclass(frozen=True)
class Plan:
    images: int
    repeats: int
    batch_size: int
    epochs: int
    image_steps: int
    steps_per_epoch: float
    total_steps: int
    warmup_steps: int
    lines: list[str]
    warnings: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines + [f"Warning: {w}" for w in self.warnings] + [f"Hint: {h}" for h in self.hints])

    def to_dict(self) -> dict:
        return {**asdict(self), "text": self.text}


@dataclass(frozen=True)
class FolderCount:
    """A further training folder or a regularisation folder, as the plan counts it."""

    label: str
    images: int
    repeats: int


def _folder_lines(dataset: FolderCount, more: Sequence[FolderCount], reg: Sequence[FolderCount], prior_loss_weight: float) -> tuple[list[str], int, list[str]]:
    """kohya's counting of several folders: ``(lines, image steps per epoch, warnings)``; the
    regularisation images' steps are matched to the training images' (:func:`balance_reg_repeats`)."""
    lines = [f"{f.label}: found {f.images} images with {f.repeats} repeats, equaling {f.images * f.repeats} steps."
             for f in (dataset, *more)]
    train = sum(f.images * f.repeats for f in (dataset, *more))
    if not reg:
        return lines, train, []
    offered = sum(f.images * f.repeats for f in reg)
    balanced = sum(balance_reg_repeats(train, [f.repeats for f in reg for _ in range(f.images)]))
    lines += [f"Regularisation {f.label}: {f.images} images with {f.repeats} repeats, equaling {f.images * f.repeats} steps." for f in reg]
    lines.append(f"As kohya does, regularisation is matched to the {train} training steps: {balanced} regularisation steps "
                 f"per epoch, weighted {prior_loss_weight:g}; {train + balanced} steps in all.")
    warnings = [f"{offered - balanced} of the {offered} regularisation steps are not used (more than the training steps)"] if offered > balanced else []
    return lines, train + balanced, warnings


def make_plan(
    images: int,
    repeats: int,
    batch_size: int,
    epochs: int = 10,
    max_train_steps: int = 0,
    warmup_ratio: float = 0.05,
    *,
    more: Sequence[FolderCount] = (),
    reg: Sequence[FolderCount] = (),
    prior_loss_weight: float = 1.0,
) -> Plan:
    """``images`` × ``repeats`` of the project's dataset, plus ``more`` training folders and ``reg``
    regularisation folders, in batches of ``batch_size``."""
    image_steps = images * repeats
    folder_lines, folder_warnings = [], []
    if more or reg:
        folder_lines, image_steps, folder_warnings = _folder_lines(FolderCount("dataset", images, repeats), more, reg, prior_loss_weight)
        images += sum(f.images for f in more)
    steps_per_epoch = image_steps / batch_size
    if max_train_steps:
        total = max_train_steps
        epochs = int(total / steps_per_epoch) if steps_per_epoch else 0
        last = f"There will be {total} steps, divided into {epochs} epochs and then some."
    else:
        total = int(epochs * steps_per_epoch)
        last = f"There will be {epochs} epochs, for around {total} total training steps."
    first = folder_lines or [f"Found {images} images with {repeats} repeats, equaling {image_steps} steps."]
    lines = [
        *first,
        f"Divide {image_steps} steps by {batch_size} batch size to get {steps_per_epoch} steps per epoch.",
        last,
    ]
    warnings, hints = list(folder_warnings), []
    if total > STEP_WARNING:
        warnings.append(f"{total} total steps is over {STEP_WARNING}; that is probably a mistake (check repeats and epochs)")
    low, high = IMAGE_STEPS_HINT
    if images and not (more or reg) and not low <= image_steps <= high:
        suggested = max(1, round((low + high) / 2 / images))
        hints.append(
            f"{images} images × {repeats} repeats = {image_steps} steps per epoch before batching; "
            f"around {low}–{high} works well for a character (try {suggested} repeat{'s' if suggested > 1 else ''})"
        )
    return Plan(
        images=images,
        repeats=repeats,
        batch_size=batch_size,
        epochs=epochs,
        image_steps=image_steps,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=int(total * warmup_ratio),
        lines=lines,
        warnings=warnings,
        hints=hints,
    )


def held_out_share(config) -> float:
    """The share of images a run holds out: none when it never validates."""
    return config.validation_split if config.validate_every_n_epochs else 0.0


def held_out_count(images: int, split: float) -> int:
    if split <= 0 or images < MIN_IMAGES_TO_HOLD_OUT:
        return 0
    return max(1, round(images * split))


def split_items(items: list, split: float, seed: int) -> tuple[list, list]:
    """``(training items, held-out items)`` of a dataset's items (in name order), each in that
    order; the choice depends only on the seed and the number of images, so a resumed run and the
    plan hold out the same ones."""
    count = held_out_count(len(items), split)
    chosen = set(random.Random(f"lorakit-validation:{seed}:{len(items)}").sample(range(len(items)), count))
    return [x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen]


def validation_line(images: int, split: float) -> str:
    held = held_out_count(images, split)
    if held:
        return f"Validation loss: {held} of {images} images held out of training ({split:.0%})."
    why = "validation_split is 0" if split <= 0 else f"fewer than {MIN_IMAGES_TO_HOLD_OUT} images, none held out"
    return f"Validation loss: measured on {min(images, MAX_VALIDATION_IMAGES)} training images with fixed noise ({why})."


def plan_for(config, images: int, more: Sequence[FolderCount] = (), reg: Sequence[FolderCount] = (), *, processes: int = 1) -> Plan:
    """The plan of a :class:`~lorakit_ext.train_config.TrainConfig` over a dataset of ``images``
    images, of which those held out for validation do not train, and the further training and
    regularisation folders it names, on ``processes`` data-parallel GPUs (each training the batch
    size, so a step takes their sum)."""
    batch = config.train_batch_size * processes
    plan = make_plan(
        images - held_out_count(images, held_out_share(config)),
        config.num_repeats,
        batch,
        config.max_train_epochs,
        config.max_train_steps,
        config.lr_warmup_ratio,
        more=more,
        reg=reg,
        prior_loss_weight=config.prior_loss_weight,
    )
    if processes > 1:
        plan = dataclasses.replace(plan, lines=[*plan.lines, f"On {processes} GPUs: batch size {config.train_batch_size} per GPU, "
                                                             f"{batch} images per step in total."])
    accumulate = config.gradient_accumulation_steps
    if accumulate > 1:
        # kohya counts optimizer steps: each takes `accumulate` batches.
        total = config.max_train_steps or int(plan.epochs * plan.steps_per_epoch / accumulate)
        line = (f"With gradient accumulation {accumulate}: {accumulate} batches ({accumulate * batch} images) "
                f"per optimizer step, {total} optimizer steps in total.")
        plan = dataclasses.replace(plan, total_steps=total, warmup_steps=int(total * config.lr_warmup_ratio), lines=[*plan.lines, line])
    if not config.validate_every_n_epochs:
        return plan
    return dataclasses.replace(plan, lines=[*plan.lines, validation_line(images, held_out_share(config))])
