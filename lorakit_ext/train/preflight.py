"""Everything about a run that can be checked before the model loads, in one place.

The CLI, the tab and the HTTP API call :func:`preflight` with the project's lock held, so a bad
setting, an empty dataset, a batch larger than the dataset or an unwritable output folder is
reported in seconds, and no run folder is created for a run that could never start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit_ext.dataset.files import list_images
from lorakit_ext.dataset.folders import ImageFolder, balance_reg_repeats, parse_folders
from lorakit_ext.errors import UserError
from lorakit_ext.export.writer import SUFFIX
from lorakit_ext.fsutil import stale_temp_files
from lorakit_ext.train.buckets import bucket_plan_for
from lorakit_ext.train.data import check_batch_size, load_folder_items, load_train_items
from lorakit_ext.train.optim import check_optimizer
from lorakit_ext.train.plan import FolderCount, held_out_share, plan_for, split_items


@dataclass
class Schedule:
    """The real step counts of a run, after bucketing (kohya's way of counting): optimizer steps,
    each of ``gradient_accumulation_steps`` batches (an epoch's last one may have fewer)."""

    steps_per_epoch: int
    epochs: int
    total_steps: int
    warmup_steps: int
    batches_per_epoch: int  # kohya's len(train_dataloader): steps_per_epoch before accumulation


def real_schedule(config, batches_per_epoch: int) -> Schedule:
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    if config.max_train_steps:
        total = config.max_train_steps
        epochs = math.ceil(total / steps_per_epoch)
    else:
        epochs = config.max_train_epochs
        total = epochs * steps_per_epoch
    return Schedule(steps_per_epoch, epochs, total, int(total * config.lr_warmup_ratio), batches_per_epoch)


@dataclass
class DatasetSchedule:
    items: list  # the images that train, regularisation images last, each with its repeats
    buckets: object  # BucketPlan of ``items``
    estimate: object  # the kohya-colab plan text
    schedule: Schedule
    validation_items: list = field(default_factory=list)  # held out of training, for validation loss
    # The further training and regularisation folders with their image counts (kohya's
    # ss_dataset_dirs / ss_reg_dataset_dirs count every image, used or not).
    folders: list = field(default_factory=list)

    @property
    def all_items(self) -> list:
        return [*self.items, *self.validation_items]


def named_folders(config, project_dir: Path) -> list[ImageFolder]:
    """The further training folders, then the regularisation folders, that ``config`` names;
    :class:`UserError` for a line that is no folder, and for the project's own dataset."""
    folders = [*parse_folders(config.dataset_folders, project_dir),
               *parse_folders(config.reg_folders, project_dir, regularisation=True)]
    own = (Path(project_dir) / "dataset").resolve()
    for folder in folders:
        if folder.path.resolve() == own:
            raise UserError(f"{folder.path} is the project's dataset, which always trains (with Repeats); remove its line")
    return folders


def _plan_counts(folders: list[tuple[ImageFolder, int]]) -> tuple[list[FolderCount], list[FolderCount]]:
    """``(further training folders, regularisation folders)`` as the plan counts them, from each
    folder with its number of images."""
    counted = [(f, FolderCount(f.label, images, f.repeats)) for f, images in folders]
    return [c for f, c in counted if not f.regularisation], [c for f, c in counted if f.regularisation]


def folder_counts(config, project_dir: Path) -> tuple[list[FolderCount], list[FolderCount]]:
    """The plan's counts of the folders ``config`` names, from listing them (no image is opened)."""
    return _plan_counts([(f, len(list_images(f.path))) for f in named_folders(config, project_dir)])


def dataset_schedule(config, dataset_dir: Path, processes: int = 1) -> DatasetSchedule:
    """Reads the dataset (``<project>/dataset``) and the folders the config names, and computes
    the real schedule, in batches of the batch size × data-parallel ``processes``; raises
    :class:`UserError` for an empty dataset or folder, or a batch larger than the images that
    train. Validation holds out images of the project's dataset only."""
    project_dir = Path(dataset_dir).parent
    folders = named_folders(config, project_dir)
    every = load_train_items(dataset_dir)
    own, held_out = split_items(every, held_out_share(config), config.seed)
    loaded = [(folder, load_folder_items(folder)) for folder in folders]
    train = [dataclasses.replace(item, repeats=config.num_repeats) for item in own]
    train += [item for folder, items in loaded if not folder.regularisation for item in items]
    offered = [item for folder, items in loaded if folder.regularisation for item in items]
    balanced = balance_reg_repeats(sum(item.repeats for item in train), [item.repeats for item in offered])
    items = train + [dataclasses.replace(item, repeats=n) for item, n in zip(offered, balanced) if n]
    check_batch_size(len(items), config.train_batch_size * processes)
    buckets = bucket_plan_for(config, [item.size for item in items])
    steps_per_epoch = buckets.steps_per_epoch([item.repeats for item in items], config.train_batch_size * processes)
    counted = [(folder, len(found)) for folder, found in loaded]
    estimate = plan_for(config, len(every), *_plan_counts(counted), processes=processes)
    return DatasetSchedule(items, buckets, estimate, real_schedule(config, steps_per_epoch), held_out, counted)


def dataset_fingerprint(items) -> str:
    """What the run trains on: file names, sizes on disk and captions (and, for a further or a
    regularisation folder's image, its path, repeats and kind). A resumed run refuses a dataset
    whose fingerprint changed, since its schedule and batches would no longer match."""
    digest = hashlib.sha256()
    for item in items:
        stat = item.image_path.stat()
        entry = [item.image_path.name, stat.st_size, list(item.size), item.caption]
        if item.folder:
            entry = [str(item.image_path), *entry[1:], item.repeats, item.regularisation]
        digest.update(json.dumps(entry).encode("utf-8"))
    return digest.hexdigest()


def schedule_fingerprint(data: DatasetSchedule) -> str:
    """The fingerprint of what ``data`` trains on, held-out images included."""
    # In name order, as the dataset lists them, whichever are held out.
    return dataset_fingerprint(sorted(data.all_items, key=lambda item: item.image_path.name))


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


def preflight(project, config, output_dir: Path, *, output_stem: str | None = None, names_under: Path | None = None,
              processes: int = 1, device: torch.device | None = None) -> Preflight:
    """Validates ``config`` against the project; call it with the project's lock held. A new run
    gets a free output stem (free in ``output_dir``, or anywhere under ``names_under``: A1111's Lora
    folder); a resumed one passes the stem it started with. ``processes``: data-parallel ranks;
    ``device``: where it will train (None: the CPU)."""
    config.validate()
    check_optimizer(config, device or torch.device("cpu"))
    if config.network_weights and not Path(config.network_weights).is_file():
        # Its modules, ranks and alphas are checked once the network is in the model.
        raise UserError(f"network_weights {config.network_weights} does not exist; give the LoRA file to continue "
                        "from, or leave it empty to start fresh")
    data = dataset_schedule(config, project.dataset, processes)
    _check_writable(Path(output_dir))
    name = config.output_name or project.name
    clean_stale_temp(project, Path(output_dir), [name])
    stem = output_stem or (free_output_stem(names_under, name, recursive=True) if names_under
                           else free_output_stem(Path(output_dir), name))
    return Preflight(data, stem, schedule_fingerprint(data))
