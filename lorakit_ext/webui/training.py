"""A training run inside A1111, from the request to the last epoch file.

:func:`prepare` runs when the request arrives (the tab's button, ``POST …/train`` or
``…/runs/{id}/resume``): it takes the project's lock and runs every check that needs no model, so
a bad request is refused at once and nothing is queued. :func:`train` runs later, as a job, on
A1111's loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit_ext.project import confine, open_project
from lorakit_ext.project_lock import ProjectLock
from lorakit_ext.webui import bridge, host


@dataclass
class PreparedRun:
    project: object  # Project
    config: object  # TrainConfig, validated
    output_dir: Path
    preflight: object  # train.preflight.Preflight
    lock: ProjectLock
    resume: object | None = None  # train.resume.ResumePoint
    force: bool = False


def _training_modules():
    try:
        from lorakit_ext.train import loop, preflight, resume
    except ModuleNotFoundError as exc:
        raise host.FeatureMissing(
            f"training needs the Python package {exc.name!r}, which this WebUI's environment lacks; "
            "restart the WebUI so LoRA Kit's install.py can add it"
        ) from None
    return loop, preflight, resume


def settings(values: dict):
    """A request's settings over the defaults of the loaded model's family (SDXL: 1024², its
    kohya-colab XL values), so a request naming only a few options trains as the tab would."""
    from modules import shared

    from lorakit_ext.models.families import defaults_of_model
    from lorakit_ext.train_config import TrainConfig

    return TrainConfig.from_sources(defaults_of_model(shared.sd_model), values)


def prepare(project_name: str, config=None, *, resume: str | None = None, force: bool = False, by: str = "the tab") -> PreparedRun:
    """Locks the project and checks the run; the caller must ``lock.release()`` when the run ends
    (or never starts). ``resume``: a run id to continue with its own settings (``config`` unused)."""
    from modules import devices

    _, preflight_module, resume_module = _training_modules()
    project = open_project(host.projects_root(), project_name)
    lock = ProjectLock(project.path, f"training (A1111, {by})").acquire()
    try:
        point = None
        if resume:
            point = resume_module.resume_point(project, resume)
            config = point.config
            # The record names the folder; it must still be one A1111 loads LoRAs from.
            output_dir = confine(point.output_dir, host.lora_root())
        else:
            output_dir = host.lora_dir()
            if config.network_weights:
                config = config.replace(network_weights=str(_lora_to_continue(config.network_weights)))
        pre = preflight_module.preflight(project, config, output_dir, output_stem=point.output_stem if point else None,
                                         names_under=host.lora_root(), device=devices.device)
        if point is not None:
            resume_module.check_unchanged(point, fingerprint=pre.fingerprint, model_sha256=None, force=force)
    except BaseException:
        lock.release()
        raise
    return PreparedRun(project, config, output_dir, pre, lock, point, force)


def _lora_to_continue(name: str) -> Path:
    """A LoRA to continue from: a path, or a name in A1111's Lora folder (``kat-04`` or
    ``sub/kat-04.safetensors``), within the folders LoRA Kit may read."""
    path = Path(name)
    if not path.is_absolute():
        path = host.lora_root() / (name if path.suffix else f"{name}.safetensors")
    return host.check_path_access(path, "continue training from")


def train(prepared: PreparedRun, *, on_progress, on_epoch_file, should_stop, on_run_dir, sampler=None):
    """Trains on A1111's loaded model; returns the :class:`~lorakit_ext.train.loop.RunResult`.
    Call with A1111's queue lock held."""
    loop, _, resume_module = _training_modules()
    from lorakit_ext.train.launch import open_run

    point = prepared.resume
    with bridge.training_model(prepared.config) as model:
        base = bridge.checkpoint_identity(model.sd_model)
        if point is not None:
            resume_module.check_unchanged(point, fingerprint=prepared.preflight.fingerprint,
                                          model_sha256=base.sha256 or None, force=prepared.force)
        job = open_run(prepared.project, prepared.config, prepared.output_dir, prepared.preflight, base, resume=point)
        on_run_dir(job.run_dir)
        trainer = loop.Trainer(model, job, on_progress=on_progress, on_epoch_file=on_epoch_file, should_stop=should_stop,
                               sampler=sampler)
        # A1111 runs generations without autograd; this thread may inherit neither, but be sure.
        with torch.enable_grad():
            return trainer.run(point.state if point else None)
