"""Writing epoch files: kohya-format LoRA + metadata, and keep-last-N for this run's files."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from lorakit_ext.dataset.tags import split_tags
from lorakit_ext.export.metadata import training_metadata
from lorakit_ext.errors import UserError
from lorakit_ext.export.writer import SUFFIX, epoch_file_name, read_lora_metadata, remove_old_epochs, write_lora_file

# Names the run that wrote a file: a run replaces an epoch file only if it wrote it itself
# (a resumed run redoing an epoch whose state was not saved before a kill).
RUN_KEY = "lorakit_run"


def step_file_name(output_name: str, step: int) -> str:
    """The name kohya gives a file saved mid-epoch: ``<name>-step00000300.safetensors``."""
    return f"{output_name}-step{step:08d}{SUFFIX}"


class EpochSaver:
    def __init__(self, job, model, items, buckets, schedule, precision: str, folders=()):
        self.job = job
        self.config = job.config
        self.model = model
        self.items = items
        self.buckets = buckets
        self.schedule = schedule
        self.optimizer_name = self.config.optimizer
        self.precision = precision
        self.output_name = job.stem
        self.started_at = time.time()
        self.files: list[Path] = []
        # kohya names a dataset folder "<repeats>_<name>"; tools that read ss_tag_frequency expect it.
        self.dataset_dir = f"{self.config.num_repeats}_{job.project.name}"
        self.tag_frequency: dict[str, dict] = {}
        for item in items:
            tags = self.tag_frequency.setdefault(item.folder or self.dataset_dir, Counter())
            tags.update(set(split_tags(item.caption)))
        own = sum(1 for item in items if not item.folder)
        self.dataset_dirs = {self.dataset_dir: {"n_repeats": self.config.num_repeats, "img_count": own}}
        self.reg_dataset_dirs: dict[str, dict] = {}
        for folder, count in folders:
            kind = self.reg_dataset_dirs if folder.regularisation else self.dataset_dirs
            kind[folder.label] = {"n_repeats": folder.repeats, "img_count": count}

    def _due(self, epoch: int) -> bool:
        return epoch % self.config.save_every_n_epochs == 0 or epoch == self.schedule.epochs

    def metadata(self, epoch: int, steps: int, stem: str | None = None) -> dict[str, str]:
        c = self.config
        return training_metadata(
            # ss_optimizer names what ran (AdamW8bit falls back to AdamW without bitsandbytes).
            c.replace(optimizer=self.optimizer_name),
            family=self.model.family,
            v_parameterization=self.model.parameterization == "v",
            output_name=stem or Path(epoch_file_name(self.output_name, epoch)).stem,
            epoch=epoch,
            num_epochs=self.schedule.epochs,
            steps=steps,
            num_train_images=sum(item.repeats for item in self.items if not item.regularisation),
            num_batches_per_epoch=self.schedule.batches_per_epoch,
            max_train_steps=self.schedule.total_steps,
            tag_frequency={folder: dict(tags) for folder, tags in self.tag_frequency.items()},
            dataset_dirs=self.dataset_dirs,
            num_reg_images=sum(d["n_repeats"] * d["img_count"] for d in self.reg_dataset_dirs.values()),
            reg_dataset_dirs=self.reg_dataset_dirs,
            bucket_info=self.buckets.bucket_info([item.repeats for item in self.items]) if c.enable_bucket else None,
            base_model_name=self.job.base_model_name,
            base_model_hash=self.job.base_model_hash,
            base_model_sha256=self.job.base_model_sha256,
            started_at=self.started_at,
            finished_at=time.time(),
            resolution=c.resolution,
            mixed_precision=self.precision,
            processes=self.job.world.size,
        )

    def save_epoch(self, network, epoch: int, steps: int, validation_loss: float | None = None) -> list[Path]:
        if not self._due(epoch):
            return []
        path = self.job.output_dir / epoch_file_name(self.output_name, epoch)
        # Not kohya's: the epoch's validation loss travels with the file, for tools that compare epochs.
        measured = {"ss_validation_loss": f"{validation_loss:.6f}"} if validation_loss is not None else {}
        self._write(path, network, {**self.metadata(epoch, steps), **measured})
        self._prune()
        return [path]

    def save_step(self, network, epoch: int, steps: int) -> list[Path]:
        """kohya's ``save_every_n_steps``: ``<name>-step00000300.safetensors`` every N optimizer steps."""
        every = self.config.save_every_n_steps
        if not every or steps % every:
            return []
        path = self.job.output_dir / step_file_name(self.output_name, steps)
        self._write(path, network, self.metadata(epoch, steps, path.name[: -len(SUFFIX)]))
        return [path]

    def _write(self, path: Path, network, metadata: dict[str, str]) -> None:
        ours = path.is_file() and read_lora_metadata(path).get(RUN_KEY) == self.job.run_id
        try:
            write_lora_file(path, network.export(), {**metadata, RUN_KEY: self.job.run_id}, replace=ours)
        except FileExistsError:
            raise UserError(
                f"{path} already exists and was not written by this run; LoRA Kit never replaces a file it did "
                "not write. Move that file away and resume, or start a new run (it picks a free name)"
            ) from None
        self.files.append(path)

    def _prune(self) -> None:
        keep = self.config.keep_only_last_n_epochs
        if not keep:
            return
        batch = remove_old_epochs(self.job.project, self.job.output_dir, self.output_name, keep, self.files)
        if batch is not None:
            moved = {Path(f.original_path).name for f in batch.files}
            self.files = [f for f in self.files if f.name not in moved]
