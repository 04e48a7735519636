"""Resuming a run as the same run: its own settings, dataset and base model, or a clear refusal.

The run record (``run.json``) holds what the run started with: the config, the output folder and
stem, the base model's path and hashes, the device options and the dataset's fingerprint. A
resume needs only the project and the run id; everything else comes from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit_ext.errors import UserError
from lorakit_ext.train_config import TrainConfig
from lorakit_ext.train.record import find_run_dir, has_saved_state, read_run
from lorakit_ext.train.state import load_state


@dataclass
class ResumePoint:
    run_dir: Path
    record: dict
    state: dict
    config: TrainConfig

    @property
    def output_dir(self) -> Path:
        return Path(self.record["output_dir"])

    @property
    def output_stem(self) -> str:
        return self.record["output_name"]

    @property
    def base_model(self) -> dict:
        return self.record.get("base_model") or {}


def resume_point(project, run: str) -> ResumePoint:
    """The saved state of ``run``; :class:`UserError` when it finished or never got to a save.
    Call it with the project's lock held: a record still saying "running" then belongs to a
    process that died, and its last saved state is what there is to resume."""
    run_dir = find_run_dir(project, run)
    record = read_run(run_dir)
    if record.get("status") == "finished":
        files = ", ".join(Path(f).name for f in record.get("files", [])) or "none kept"
        raise UserError(
            f"run {run_dir.name} finished ({record.get('steps_done', 0)} steps; files: {files}); "
            "there is nothing to resume. Start a new run to train more"
        )
    if not has_saved_state(run_dir):
        raise UserError(
            f"run {run_dir.name} stopped before it saved any state ({record.get('error') or record.get('status')}); "
            "there is nothing to resume, start a new run"
        )
    if "output_dir" not in record or "output_name" not in record:
        raise UserError(f"run {run_dir.name} was recorded by an older LoRA Kit without its output folder; start a new run")
    state = load_state(run_dir)
    # A run saved before validation_split existed held nothing out; it goes on that way.
    config = TrainConfig.from_dict({"validation_split": 0.0, **state["config"]}).validate()
    return ResumePoint(run_dir, record, state, config)


def check_unchanged(point: ResumePoint, *, fingerprint: str, model_sha256: str | None, force: bool) -> None:
    """Refuses (unless ``force``) a dataset or base model that differs from the run's start:
    the schedule, the batches and the meaning of the saved weights would not match any more."""
    changed = []
    if point.record.get("dataset_fingerprint") not in (None, fingerprint):
        changed.append("the dataset (images or captions) changed since the run started")
    recorded = point.base_model.get("sha256")
    if model_sha256 is not None and recorded and model_sha256 != recorded:
        changed.append(f"the base model is not the one the run started with (sha256 {recorded[:10]}, now {model_sha256[:10]})")
    if changed and not force:
        raise UserError(
            f"cannot resume run {point.run_dir.name}: " + "; ".join(changed)
            + ". Restore them, start a new run, or resume anyway with --force"
        )
