"""The run record in ``runs/<run-id>/``: what was asked (config, plan), what happened (status,
per-step loss CSV, files written) and how to reproduce it with kohya sd-scripts."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from lorakit_ext.errors import UserError
from lorakit_ext.export.kohya_toml import dataset_toml, training_toml
from lorakit_ext.fsutil import atomic_write_json, atomic_write_text
from lorakit_ext.project import confine


def new_run_dir(project, output_name: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = project.runs / f"{stamp}-{output_name}"
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = project.runs / f"{stamp}-{output_name}-{n}"
    run_dir.mkdir(parents=True)
    return project.inside(run_dir)


def find_run_dir(project, run: str) -> Path:
    """A run by id (folder name) or path, confined to the project's ``runs/``."""
    candidate = Path(run) if Path(run).is_absolute() or "/" in run else project.runs / run
    if not candidate.is_dir():
        known = sorted(p.name for p in project.runs.iterdir()) if project.runs.is_dir() else []
        hint = f"; runs: {', '.join(known[-5:])}" if known else ""
        raise UserError(f"no run {run!r} in {project.runs}{hint}")
    return confine(candidate, project.runs)


class RunRecord:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.info: dict = {}

    def start(self, config, estimate, schedule, buckets, precision: str, model, job) -> None:
        output_name = config.output_name or job.project.name
        atomic_write_json(self.run_dir / "config.json", config.to_dict())
        real = (
            f"After bucketing: {schedule.steps_per_epoch} steps per epoch, {schedule.epochs} epochs, "
            f"{schedule.total_steps} steps in total, {schedule.warmup_steps} warmup steps."
        )
        atomic_write_text(self.run_dir / "plan.txt", estimate.text + "\n" + real + "\n" + buckets.describe(config.num_repeats, config.train_batch_size) + "\n")
        atomic_write_text(
            self.run_dir / "kohya_config.toml",
            training_toml(
                config,
                base_model=job.base_model_name or "<path of the base checkpoint>",
                output_dir=str(job.output_dir),
                output_name=output_name,
                total_steps=schedule.total_steps,
                warmup_steps=schedule.warmup_steps,
                v_parameterization=model.parameterization == "v",
                v2=model.arch == "sd2",
                mixed_precision=precision,
                optimizer=config.optimizer,
            ),
        )
        atomic_write_text(self.run_dir / "kohya_dataset.toml", dataset_toml(config, job.project.dataset))
        self.info = {
            "status": "running",
            "output_name": output_name,
            "output_dir": str(job.output_dir),
            "started_at": time.time(),
            "plan": estimate.to_dict(),
            "steps_per_epoch": schedule.steps_per_epoch,
            "epochs": schedule.epochs,
            "total_steps": schedule.total_steps,
            "precision": precision,
            "files": [],
        }
        atomic_write_json(self.run_dir / "run.json", self.info)

    def update(self, losses: list[float], files: list[Path]) -> None:
        rows = "".join(f"{i + 1},{loss:.6f}\n" for i, loss in enumerate(losses))
        atomic_write_text(self.run_dir / "loss.csv", "step,loss\n" + rows)
        self.info["files"] = [str(f) for f in files]
        self.info["steps_done"] = len(losses)
        atomic_write_json(self.run_dir / "run.json", self.info)

    def fail(self, error: str) -> None:
        """Marks the run failed; loss.csv keeps the losses of the last saved epoch."""
        self.info.update(status="failed", error=error, finished_at=time.time())
        atomic_write_json(self.run_dir / "run.json", self.info)

    def finish(self, status: str, losses: list[float], files: list[Path]) -> None:
        self.info["status"] = status
        self.info["finished_at"] = time.time()
        self.update(losses, files)


def read_run(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
