"""Starting a run, the same way from the CLI, the tab, the API and the demo: the run folder with
its origin record, and the :class:`~lorakit_ext.train.loop.TrainJob` the trainer runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from lorakit_ext.train.data_parallel import World
from lorakit_ext.train.loop import TrainJob
from lorakit_ext.train.record import new_run_dir


@dataclass(frozen=True)
class BaseModel:
    """The checkpoint a run trains on, as its files' metadata and a resume name it."""

    name: str = ""  # file name
    path: str = ""  # absolute path of the file; "" when A1111 holds a model without one
    legacy_hash: str = ""
    sha256: str = ""


def open_run(project, config, output_dir: Path, preflight, base: BaseModel, *, options: dict | None = None,
             resume=None, world: World = World(), **job_options) -> TrainJob:
    """The job for a new run (a new run folder recording its origin) or for ``resume`` (a
    :class:`~lorakit_ext.train.resume.ResumePoint`, whose folder it continues). ``options`` are the
    front door's own settings a resume must repeat (device, weights, model config). Data-parallel
    ranks other than 0 (``world``) join the folder rank 0 created."""
    if resume is not None:
        run_dir = resume.run_dir
    elif not world.main:
        run_dir = world.broadcast(None)
    else:
        run_dir = new_run_dir(project, preflight.output_stem, {
            "project": project.name,
            "root": str(project.root),
            "output_name": preflight.output_stem,
            "output_dir": str(Path(output_dir)),
            "base_model": asdict(base),
            "options": options or {},
            "dataset_fingerprint": preflight.fingerprint,
        })
        world.broadcast(run_dir)
    return TrainJob(config, project, Path(output_dir), run_dir, base_model_name=base.name,
                    base_model_hash=base.legacy_hash, base_model_sha256=base.sha256, base_model_path=base.path,
                    output_stem=preflight.output_stem, dataset=preflight.data, world=world, **job_options)
