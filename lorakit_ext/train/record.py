"""The run record in ``runs/<run-id>/``: what was asked (config, plan), what happened (status,
per-step loss CSV, files written) and how to reproduce it with kohya sd-scripts."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from lorakit_ext.errors import UserError
from lorakit_ext.export.kohya_toml import dataset_toml, sample_prompts_text, training_toml
from lorakit_ext.fsutil import atomic_write_json, atomic_write_text
from lorakit_ext.project import confine


def new_run_dir(project, output_name: str, origin: dict) -> Path:
    """Creates ``runs/<stamp>-<output name>[-N]`` (mkdir is the atomic claim: two callers never get
    one folder) with a ``run.json`` holding ``origin``: what a resume needs to be the same run
    (base model, output folder, dataset fingerprint, device options)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    project.runs.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        run_dir = project.runs / (f"{stamp}-{output_name}" if n == 1 else f"{stamp}-{output_name}-{n}")
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        project.inside(run_dir)
        atomic_write_json(run_dir / RUN_FILE, {"status": "starting", "run": run_dir.name, **origin})
        return run_dir
    raise UserError(f"could not create a run folder in {project.runs}: too many runs started this second")


def find_run_dir(project, run: str) -> Path:
    """A run by id (folder name) or path, confined to the project's ``runs/``."""
    candidate = Path(run) if Path(run).is_absolute() or "/" in run else project.runs / run
    if not candidate.is_dir():
        known = sorted(p.name for p in project.runs.iterdir()) if project.runs.is_dir() else []
        hint = f"; runs: {', '.join(known[-5:])}" if known else ""
        raise UserError(f"no run {run!r} in {project.runs}{hint}")
    return confine(candidate, project.runs)


RUN_FILE = "run.json"
STATE_FILE = "state.pt"  # written by train.state after every epoch and on interrupt


def has_saved_state(run_dir: Path) -> bool:
    """Whether the run saved a state a resume can continue from."""
    return (Path(run_dir) / STATE_FILE).is_file()


class RunRecord:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        path = self.run_dir / RUN_FILE
        self.info: dict = read_run(self.run_dir) if path.is_file() else {}

    def start(self, config, estimate, schedule, buckets, precision: str, model, job, repeats=None, folders=(), samples=None) -> None:
        """Writes the run's config, plan and kohya TOML pair; ``repeats``: each image's (default:
        the config's for all); ``folders``: the further training and regularisation folders;
        ``samples``: the :class:`~lorakit_ext.train.sampling.SampleRequest` of a run that draws
        samples, whose prompts go to ``kohya_sample_prompts.txt``."""
        output_name = job.stem
        prompts = None
        if samples is not None:
            prompts = self.run_dir / "kohya_sample_prompts.txt"
            atomic_write_text(prompts, sample_prompts_text(samples.prompts, samples.seeds, samples.size))
        atomic_write_json(self.run_dir / "config.json", config.to_dict())
        real = (
            f"After bucketing: {schedule.steps_per_epoch} steps per epoch, {schedule.epochs} epochs, "
            f"{schedule.total_steps} steps in total, {schedule.warmup_steps} warmup steps."
        )
        atomic_write_text(self.run_dir / "plan.txt", estimate.text + "\n" + real + "\n" + buckets.describe(repeats or config.num_repeats, config.train_batch_size) + "\n")
        atomic_write_text(
            self.run_dir / "kohya_config.toml",
            training_toml(
                config,
                base_model_path=job.base_model_path,
                script=model.family.kohya_script,
                dataset_config=str(self.run_dir / "kohya_dataset.toml"),
                output_dir=str(job.output_dir),
                output_name=output_name,
                total_steps=schedule.total_steps,
                warmup_steps=schedule.warmup_steps,
                v_parameterization=model.parameterization == "v",
                v2=model.family.v2,
                mixed_precision=precision,
                optimizer=config.optimizer,
                sample_prompts=str(prompts) if prompts else None,
            ),
        )
        atomic_write_text(self.run_dir / "kohya_dataset.toml", dataset_toml(config, job.project.dataset, folders))
        self.info.update({
            "status": "running",
            "output_name": output_name,
            "output_dir": str(job.output_dir),
            "started_at": time.time(),
            "plan": estimate.to_dict(),
            "steps_per_epoch": schedule.steps_per_epoch,
            "epochs": schedule.epochs,
            "total_steps": schedule.total_steps,
            "precision": precision,
            "files": self.info.get("files", []),
        })
        atomic_write_json(self.run_dir / RUN_FILE, self.info)

    def update(self, losses: list[float], files: list[Path], validation: list[tuple[int, int, float]] = (),
               phases: dict | None = None, epoch_ends: list[dict] | None = None) -> None:
        """``validation``: ``(epoch, step, loss)`` rows; each loss goes beside its step's.
        ``phases``: seconds each part of the start took (latents, network, first step…);
        ``epoch_ends``: each epoch end's seconds by part (validation, files and samples, resume state)."""
        at_step = {step: loss for _, step, loss in validation}
        rows = "".join(f"{i + 1},{loss:.6f},{_number(at_step.get(i + 1))}\n" for i, loss in enumerate(losses))
        atomic_write_text(self.run_dir / "loss.csv", "step,loss,validation_loss\n" + rows)
        self.info["files"] = [str(f) for f in files]
        self.info["steps_done"] = len(losses)
        self.info["validation"] = [{"epoch": e, "step": s, "loss": v} for e, s, v in validation]
        if phases:
            self.info["phases_s"] = dict(phases)
        if epoch_ends:
            self.info["epoch_end_s"] = list(epoch_ends)
        atomic_write_json(self.run_dir / RUN_FILE, self.info)

    def fail(self, error: str) -> None:
        """Marks the run failed; loss.csv keeps the losses of the last saved epoch."""
        self.end("failed", error=error)

    def end(self, status: str, **details) -> None:
        """Ends the record without touching loss.csv (a run that stopped before its first step)."""
        self.info.update(status=status, finished_at=time.time(), **details)
        atomic_write_json(self.run_dir / RUN_FILE, self.info)

    def finish(self, status: str, losses: list[float], files: list[Path], validation=(), phases=None, epoch_ends=None,
               **details) -> None:
        self.info.update(status=status, finished_at=time.time(), **details)
        self.update(losses, files, validation, phases, epoch_ends)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def read_run(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{run_dir} has no {RUN_FILE}; it is not a LoRA Kit run folder") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"the run record {path} is unreadable ({exc}); start a new run") from None


def list_runs(project) -> list[dict]:
    """The project's runs, newest first: id, status, output stem, progress, and whether it can be
    resumed (it did not finish and saved a state; a run still marked running whose process is
    gone counts too, since the project's lock is free)."""
    from lorakit_ext.project_lock import read_holder

    busy = read_holder(project.path) is not None
    runs = []
    for run_dir in sorted((p for p in project.runs.glob("*") if p.is_dir()), reverse=True):
        try:
            info = read_run(run_dir)
        except UserError:
            continue
        status = info.get("status", "unknown")
        live = status in ("starting", "running") and busy
        runs.append({
            "run": run_dir.name,
            "status": status,
            "output_name": info.get("output_name"),
            "steps_done": info.get("steps_done", 0),
            "total_steps": info.get("total_steps"),
            "error": info.get("error"),
            "resumable": status != "finished" and not live and has_saved_state(run_dir),
        })
    return runs


class ReadOnlyRecord(RunRecord):
    """The record as data-parallel ranks other than 0 hold it: they follow the run's status, and
    rank 0 alone writes the run folder."""

    def start(self, *args, **kwargs) -> None:
        self.info["status"] = "running"

    def update(self, *args, **kwargs) -> None:
        pass

    def end(self, status: str, **details) -> None:
        self.info.update(status=status, **details)
