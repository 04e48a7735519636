"""Everything about a run that can be checked before the model loads, in one place.

The CLI, the tab and the HTTP API call :func:`preflight` with the project's lock held, so a bad
setting, an empty dataset, a batch larger than the dataset or an unwritable output folder is
reported in seconds, and no run folder is created for a run that could never start.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lorakit_ext.errors import UserError
from lorakit_ext.export.writer import SUFFIX
from lorakit_ext.fsutil import stale_temp_files
from lorakit_ext.train.buckets import bucket_plan_for
from lorakit_ext.train.data import check_batch_size, load_train_items
from lorakit_ext.train.optim import check_optimizer
from lorakit_ext.train.plan import held_out_share, plan_for, split_items


@dataclass
class Schedule:
    """The real step counts of a run, after bucketing (kohya's way of counting): optimizer steps,
    each of ``gradient_accumulation_steps`` batches (an epoch's last one may have fewer)."""

    steps_per_epoch: int
    epochs: int
    total_steps: int
    warmup_steps: int


def real_schedule(config, batches_per_epoch: int) -> Schedule:
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    if config.max_train_steps:
        total = config.max_train_steps
        epochs = math.ceil(total / steps_per_epoch)
    else:
        epochs = config.max_train_epochs
        total = epochs * steps_per_epoch
    return Schedule(steps_per_epoch, epochs, total, int(total * config.lr_warmup_ratio))


@dataclass
class DatasetSchedule:
    items: list  # the images that train
    buckets: object  # BucketPlan of ``items``
    estimate: object  # the kohya-colab plan text
    schedule: Schedule
    validation_items: list = field(default_factory=list)  # held out of training, for validation loss

    @property
    def all_items(self) -> list:
        return [*self.items, *self.validation_items]


def dataset_schedule(config, dataset_dir: Path) -> DatasetSchedule:
    """Reads the dataset and computes the real schedule; raises :class:`UserError` for an empty
    dataset or a batch larger than the images that train."""
    every = load_train_items(dataset_dir)
    items, held_out = split_items(every, held_out_share(config), config.seed)
    check_batch_size(len(items), config.train_batch_size)
    buckets = bucket_plan_for(config, [item.size for item in items])
    steps_per_epoch = buckets.steps_per_epoch(config.num_repeats, config.train_batch_size)
    return DatasetSchedule(items, buckets, plan_for(config, len(every)), real_schedule(config, steps_per_epoch), held_out)


def dataset_fingerprint(items) -> str:
    """What the run trains on: file names, sizes on disk and captions. A resumed run refuses a
    dataset whose fingerprint changed, since its schedule and batches would no longer match."""
    digest = hashlib.sha256()
    for item in items:
        stat = item.image_path.stat()
        digest.update(json.dumps([item.image_path.name, stat.st_size, list(item.size), item.caption]).encode("utf-8"))
    return digest.hexdigest()


def _file_names(folder: Path, recursive: bool) -> set[str]:
    if not recursive:
        try:
            return set(os.listdir(folder))
        except FileNotFoundError:
            return set()
    return {name for _, _, files in os.walk(folder) for name in files}


def free_output_stem(folder: Path, name: str, *, recursive: bool = False) -> str:
    """``name``, or ``name-v2``, ``name-v3``… : the first stem with no epoch files in ``folder``
    (``recursive``: anywhere below it, as A1111 lists LoRAs of every sub-folder under one name).

    A run never writes into another run's stem, so no earlier run's (or the user's own)
    ``<name>-01.safetensors`` is ever replaced, and A1111's aliases (``ss_output_name``) stay unique.
    """
    names = _file_names(Path(folder), recursive)

    def taken(stem: str) -> bool:
        # Epoch files, and the step files of save_every_n_steps.
        pattern = re.compile(re.escape(stem) + r"-(\d{2,}|step\d{8})" + re.escape(SUFFIX) + "$")
        return any(pattern.match(n) for n in names)

    stem, n = name, 1
    while taken(stem):
        n += 1
        stem = f"{name}-v{n}"
    return stem


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output folder {folder}: {exc.strerror}; choose another with --out") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"the output folder {folder} is not writable; fix its permissions or choose another with --out")


def clean_stale_temp(project, output_dir: Path, output_names: list[str]) -> list[Path]:
    """Removes the temp files that a killed run of this project left behind (ours, never the
    user's: atomic writes name their temp files ``.<file>.<pid>.<random>.tmp``)."""
    folders = [project.path, project.dataset, project.runs, *[p for p in project.runs.glob("*") if p.is_dir()]]
    removed = [f for folder in folders for f in stale_temp_files(folder)]
    prefixes = tuple(f"{name}-" for name in output_names)
    removed += stale_temp_files(output_dir, lambda final: final.startswith(prefixes) and final.endswith(SUFFIX))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


@dataclass
class Preflight:
    data: DatasetSchedule
    output_stem: str
    fingerprint: str


def preflight(project, config, output_dir: Path, *, output_stem: str | None = None, names_under: Path | None = None) -> Preflight:
    """Validates ``config`` against the project; call it with the project's lock held. A new run
    gets a free output stem (free in ``output_dir``, or anywhere under ``names_under``: A1111's Lora
    folder); a resumed one passes the stem it started with."""
    config.validate()
    check_optimizer(config)
    if config.network_weights and not Path(config.network_weights).is_file():
        # Its modules, ranks and alphas are checked once the network is in the model.
        raise UserError(f"network_weights {config.network_weights} does not exist; give the LoRA file to continue "
                        "from, or leave it empty to start fresh")
    data = dataset_schedule(config, project.dataset)
    _check_writable(Path(output_dir))
    name = config.output_name or project.name
    clean_stale_temp(project, Path(output_dir), [name])
    stem = output_stem or (free_output_stem(names_under, name, recursive=True) if names_under
                           else free_output_stem(Path(output_dir), name))
    # In name order, as the dataset lists them, whichever are held out.
    return Preflight(data, stem, dataset_fingerprint(sorted(data.all_items, key=lambda item: item.image_path.name)))
