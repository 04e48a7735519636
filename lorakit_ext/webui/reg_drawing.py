"""Regularisation images drawn by A1111's own txt2img on the loaded model, from the dataset's
captions without the trigger, into ``<project>/reg/`` (:mod:`lorakit_ext.dataset.reg_images`):
the one drawing behind the Train tab's "Generate regularisation images"
(:mod:`~lorakit_ext.webui.ui_reg_images`) and ``POST /lorakit/v1/projects/{name}/reg-images``.

:func:`prepare` runs when the request comes, before anything is drawn or queued: an empty dataset
is refused and the project's lock taken, so a second writer is refused at once. :func:`draw` runs
as an A1111 job (A1111's queue lock held) whose progress bar counts the images and whose Interrupt
keeps the pairs finished before it; it lets go of the project's lock however it ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lorakit_ext.dataset.reg_images import REG_LINE, OnProgress, RegReport, dataset_reg_prompts, prompts_note, write_reg_images
from lorakit_ext.project import Project
from lorakit_ext.project_lock import ProjectLock
from lorakit_ext.train.events import Interrupted
from lorakit_ext.webui import jobs

DEFAULT_STEPS = 20


@dataclass
class Drawing:
    project: Project
    prompts: list[str]  # one per dataset image; image n takes prompt n, cycling
    trigger: str
    steps: int
    seed: int
    width: int
    height: int
    count: int | None  # None: one per dataset image
    lock: ProjectLock  # held from prepare() until draw() ends


def prepare(project: Project, trigger: str, *, steps: int, seed: int, width: int, height: int,
            count: int | None = None, by: str) -> Drawing:
    """The checked request with the project's lock held for it; ``by`` names the front door in the
    lock ("the tab", "HTTP API"). :class:`UserError` for an empty dataset, ``ProjectBusy`` when
    another operation holds the project."""
    prompts = dataset_reg_prompts(project, trigger)
    lock = ProjectLock(project.path, f"drawing regularisation images ({by})").acquire()
    return Drawing(project, prompts, trigger, steps, seed, width, height, count, lock)


def _image_now(done: int, total: int) -> str:
    return f"regularisation image {min(done + 1, total)}/{total}"


def mirror_progress(state):
    """The images as A1111 jobs: txt2img counts each one's steps and moves ``job_no`` on after it."""

    def show(done: int, total: int, path) -> None:
        state.job_count, state.job_no = total, done
        state.textinfo = _image_now(done, total)

    return show


def draw(drawing: Drawing, *, should_stop: Callable[[], bool] = lambda: False,
         on_progress: OnProgress | None = None) -> RegReport:
    """Draws the images (call with A1111's queue lock held) and releases the project's lock.
    A1111's Interrupt or ``should_stop()`` stops it after the finished pairs; ``on_progress``
    hears of each image besides A1111's progress bar."""
    from modules import shared

    from lorakit_ext.webui.samples import a1111_render

    mirror = mirror_progress(shared.state)

    def progress(done: int, total: int, path: Path | None) -> None:
        mirror(done, total, path)
        if on_progress is not None:
            on_progress(done, total, path)

    try:
        return write_reg_images(
            drawing.project, drawing.prompts, a1111_render(drawing.width, drawing.height, drawing.steps),
            seed=drawing.seed, count=drawing.count, on_progress=progress,
            should_stop=lambda: shared.state.interrupted or should_stop(),
        )
    finally:
        drawing.lock.release()


def start_job(drawing: Drawing) -> str:
    """Queues the drawing as a background job (the HTTP API's) and returns its id at once; its
    status, progress (``step`` of ``total_steps`` images) and the files written so far show in
    :func:`jobs.job_status`, and :func:`jobs.interrupt` stops it."""
    job = jobs.new_job("reg-images", drawing.project.name)
    jobs.spawn(job, lambda: _draw_as_job(job, drawing), on_end=drawing.lock.release)
    return job.id


def _draw_as_job(job: jobs.Job, drawing: Drawing) -> None:
    written: list[str] = []

    def progress(done: int, total: int, path: Path | None) -> None:
        if path is not None:
            written.append(str(path))
        job.set(phase="drawing", step=done, total_steps=total, files=list(written),
                message=_image_now(done, total))

    report = draw(drawing, should_stop=job.cancel.is_set, on_progress=progress)
    if report.stopped:
        raise Interrupted(report.text())
    job.set(message=f"{report.text()}; {prompts_note(drawing.trigger)}; train with them through the line "
                    f"{REG_LINE!r} in reg_folders")
