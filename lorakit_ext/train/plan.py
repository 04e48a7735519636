"""The training plan shown before training, in the words kohya-colab's Lora Trainer prints it.

Pure arithmetic: the trainer reports the real number of steps after bucketing next to it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# The notebook aborts above this; we warn, because a long run can be deliberate.
STEP_WARNING = 10_000
# kohya-colab's advice: images × repeats per epoch in this range trains a character well.
IMAGE_STEPS_HINT = (200, 400)


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


def make_plan(
    images: int,
    repeats: int,
    batch_size: int,
    epochs: int = 10,
    max_train_steps: int = 0,
    warmup_ratio: float = 0.05,
) -> Plan:
    image_steps = images * repeats
    steps_per_epoch = image_steps / batch_size
    if max_train_steps:
        total = max_train_steps
        epochs = int(total / steps_per_epoch) if steps_per_epoch else 0
        last = f"There will be {total} steps, divided into {epochs} epochs and then some."
    else:
        total = int(epochs * steps_per_epoch)
        last = f"There will be {epochs} epochs, for around {total} total training steps."
    lines = [
        f"Found {images} images with {repeats} repeats, equaling {image_steps} steps.",
        f"Divide {image_steps} steps by {batch_size} batch size to get {steps_per_epoch} steps per epoch.",
        last,
    ]
    warnings, hints = [], []
    if total > STEP_WARNING:
        warnings.append(f"{total} total steps is over {STEP_WARNING}; that is probably a mistake (check repeats and epochs)")
    low, high = IMAGE_STEPS_HINT
    if images and not low <= image_steps <= high:
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


def plan_for(config, images: int) -> Plan:
    """The plan of a :class:`~lorakit_ext.train_config.TrainConfig` over ``images`` images."""
    return make_plan(
        images,
        config.num_repeats,
        config.train_batch_size,
        config.max_train_epochs,
        config.max_train_steps,
        config.lr_warmup_ratio,
    )
