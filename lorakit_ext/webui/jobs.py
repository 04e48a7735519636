"""The one runner for LoRA Kit's GPU jobs, behind both the tab's button and the HTTP API.

A job runs with A1111's ``queue_lock`` held, so generations queue behind it instead of colliding
with it, and reports through ``shared.state`` so A1111's progress bar, ETA and Interrupt work.
The button's handler already runs inside ``wrap_gradio_gpu_call`` (lock and state set up by
A1111); API jobs run in a background thread that takes the lock and sets up the state itself.
Never call A1111's HTTP API from inside a job: its handlers wait for the lock the job holds.
"""

from __future__ import annotations

import html
import json
import logging
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from lorakit_ext.errors import UserError
from lorakit_ext.failures import as_user_error
from lorakit_ext.project import open_project
from lorakit_ext.train_config import TrainConfig
from lorakit_ext.train.events import Interrupted, Progress
from lorakit_ext.webui import bridge, host, samples, suggestion, training
from lorakit_ext.webui.job_progress import StateMirror
from lorakit_ext.webui.settings import parse_seeds, setting

log = logging.getLogger(__name__)

KEEP_JOBS = 32
# In the tab's settings JSON: the id of the run to resume instead of a new run's options.
RESUME_KEY = "resume_run"


class UnknownJob(UserError):
    """No job with that id (or no job at all)."""


@dataclass
class Job:
    id: str
    kind: str  # "train" | "grid" | "reg-images"
    project: str
    status: str = "queued"  # queued | running | finished | interrupted | failed
    phase: str = ""
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    message: str = ""
    losses: list = field(default_factory=list)  # [[step, loss], …]
    validation: list = field(default_factory=list)  # [[epoch, step, validation loss], …]
    files: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    grid: str | None = None
    suggestion: dict | None = None  # {"epoch", "label", "reason"}: the suggested epoch of the trained run
    error: str | None = None
    run_dir: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    # The grid's cells, (column label, seed, weight) → PIL image: previews for promote, not JSON.
    grid_cells: dict = field(default_factory=dict, repr=False)

    def set(self, **changes) -> None:
        with _lock:
            for name, value in changes.items():
                setattr(self, name, value)

    def record(self, p: Progress) -> None:
        with _lock:
            self.phase, self.message = p.phase, p.message
            if p.phase == "caching":
                return
            self.epoch, self.epochs, self.step, self.total_steps = p.epoch, p.epochs, p.step, p.total_steps
            # "saving" reports carry no rates; keep the last ones seen.
            if p.phase == "training":
                self.loss, self.lr, self.it_per_s, self.eta_s = p.loss, p.lr, p.it_per_s, p.eta_s
            # On a GPU the trainer reads losses back every 10 steps and reports the last one read
            # in between, so a new value marks the step it belongs to; repeats are not points.
            if p.loss is not None and (not self.losses or self.losses[-1][1] != p.loss):
                self.losses.append([p.step, p.loss])
            if p.validation_loss is not None:
                self.validation.append([p.epoch, p.step, p.validation_loss])

    def to_dict(self) -> dict:
        with _lock:
            data = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in ("cancel", "grid_cells")}
            data["losses"] = [list(point) for point in self.losses]
            data["validation"] = [list(point) for point in self.validation]
            data["files"], data["samples"] = list(self.files), list(self.samples)
        return data


_lock = threading.Lock()
_jobs: dict[str, Job] = {}


def new_job(kind: str, project: str, job_id: str | None = None) -> Job:
    """A queued job of ``kind`` on ``project``, listed by :func:`job_status` from now on."""
    job = Job(job_id or f"lorakit-{uuid.uuid4().hex[:12]}", kind, project)
    with _lock:
        _jobs[job.id] = job
        done = [j for j in _jobs.values() if j.status not in ("queued", "running")]
        for old in done[: max(0, len(_jobs) - KEEP_JOBS)]:
            del _jobs[old.id]
    return job


def _find(job_id: str | None) -> Job:
    with _lock:
        if job_id is None:
            if not _jobs:
                raise UnknownJob("no LoRA Kit job has run since the WebUI started")
            return next(reversed(_jobs.values()))
        if job_id not in _jobs:
            raise UnknownJob(f"no job {job_id!r} (only the last {KEEP_JOBS} jobs since the WebUI started are kept)")
        return _jobs[job_id]


def job_status(job_id: str | None = None) -> dict:
    """The job's state as a JSON-ready dict (``None``: the latest job); :class:`UnknownJob` if none."""
    return _find(job_id).to_dict()


def grid_cells(job_id: str | None = None) -> dict:
    """The cells of the job's grid, ``(column label, seed, weight)`` → PIL image; empty without one."""
    job = _find(job_id)
    with _lock:
        return dict(job.grid_cells)


def interrupt(job_id: str | None = None) -> bool:
    """Stops a queued or running job (``None``: the latest); False when it had already ended. A
    running training job saves its state and stops before its next step."""
    from modules import shared

    job = _find(job_id)
    with _lock:
        if job.status not in ("queued", "running"):
            return False
        job.cancel.set()
        running = job.status == "running"
    if running:
        shared.state.interrupt()
    return True


# ---- running ----------------------------------------------------------------------------------
def _execute(job: Job, work) -> None:
    """Runs ``work`` and records how it ended; never raises (the caller holds the queue lock)."""
    job.set(status="running", phase="starting")
    try:
        work()
    except Interrupted as exc:
        # Raised with what the work kept: training's says its epochs are.
        job.set(status="interrupted", message=str(exc))
    except Exception as exc:  # noqa: BLE001 - a job must end with a status, whatever broke
        known = as_user_error(exc)
        if known is None:
            log.exception("LoRA Kit job %s failed", job.id)
        job.set(status="failed", error=str(known) if known else f"{type(exc).__name__}: {exc}")
    else:
        job.set(status="finished", phase="done")
    finally:
        with _lock:
            job.files = [f for f in job.files if Path(f).is_file()]
        bridge.free_memory()


def spawn(job: Job, work, on_end=lambda: None) -> None:
    """Runs ``work`` as a queued job in its own thread; ``on_end`` runs however it ends, also when
    the job was cancelled before it started."""

    def main():
        try:
            _run_queued(job, work)
        finally:
            on_end()

    threading.Thread(target=main, name=job.id, daemon=True).start()


def _run_queued(job: Job, work) -> None:
    from modules import call_queue, shared

    with call_queue.queue_lock:
        if job.cancel.is_set():
            job.set(status="interrupted", message="cancelled before it started")
            return
        shared.state.begin(job=f"lorakit-{job.kind}")
        try:
            _execute(job, work)
        finally:
            shared.state.end()
            # What wrap_gradio_call resets after a button's job, so the next one starts clean.
            shared.state.interrupted = shared.state.skipped = shared.state.stopping_generation = False
            shared.state.job_count, shared.state.job = 0, ""


def _train(job: Job, prepared) -> None:
    from modules import shared

    mirror = StateMirror(shared.state)

    def on_progress(p: Progress) -> None:
        mirror(p)
        job.record(p)

    def on_epoch_file(path: Path) -> None:
        host.refresh_loras()
        bridge.check_lora_file(path)
        bridge.reset_cond_cache()
        with _lock:
            job.files.append(str(path))

    def on_samples(paths: list[Path]) -> None:
        with _lock:
            job.samples.extend(str(p) for p in paths)

    result = training.train(
        prepared, on_progress=on_progress, on_epoch_file=on_epoch_file,
        should_stop=lambda: shared.state.interrupted or job.cancel.is_set(),
        on_run_dir=lambda run_dir: job.set(run_dir=str(run_dir)), sampler=samples.a1111_sampler(on_samples),
    )
    job.set(files=[str(f) for f in result.files], losses=[[i + 1, loss] for i, loss in enumerate(result.losses)],
            message=f"trained {result.steps} steps into {len(result.files)} file(s) in {prepared.output_dir}")
    _suggest(job, suggestion.saved_report(result.run_dir))
    output_name = prepared.config.output_name or prepared.project.name
    if setting("lorakit_auto_grid") and result.files:
        _auto_grid(job, [f.stem for f in result.files], trigger=prepared.config.trigger or output_name,
                   output_name=prepared.preflight.output_stem)


def _auto_grid(job: Job, lora_names: list[str], **prompt_parts) -> None:
    """The grid after training: if it fails, the trained files are still a success."""
    try:
        _grid(job, _grid_request(lora_names, **prompt_parts))
    except Interrupted:
        raise
    except Exception as exc:  # noqa: BLE001 - the epochs are saved; report the grid's failure beside them
        log.exception("LoRA Kit grid after job %s failed", job.id)
        _note(job, f"the grid failed: {exc}")


def _note(job: Job, text: str) -> None:
    with _lock:
        job.message = f"{job.message}; {text}" if job.message else text


def grid_prompt(template: str, trigger: str, output_name: str, first_lora: str) -> str:
    """The test prompt with ``<trigger>`` and ``<name>`` filled in, naming ``first_lora`` in its
    ``<lora:…>`` tag (the X axis replaces that name with each epoch's)."""
    text = template.replace("<name>-01", first_lora).replace("<trigger>", trigger).replace("<name>", output_name)
    if f"<lora:{first_lora}:" not in text:
        text += f" <lora:{first_lora}:1>"
    return text


def _grid_request(lora_names: list[str], *, trigger: str, output_name: str, prompt: str | None = None,
                  negative: str = "", seeds: list[int] | None = None, weights: list[float] | None = None,
                  baseline: bool = True, steps: int | None = None, width: int | None = None,
                  height: int | None = None, cfg_scale: float = 7.0) -> dict:
    """``run_epoch_grid``'s arguments, unset ones from the settings, all checked (:class:`UserError`):
    the settings too, since ``POST /sdapi/v1/options`` stores any value."""
    from modules import shared

    from lorakit_ext.webui import xyz

    size = setting("lorakit_grid_size")
    request = dict(
        lora_names=list(lora_names),
        prompt=grid_prompt(prompt or setting("lorakit_test_prompt"), trigger, output_name, lora_names[0]),
        negative=negative,
        seeds=seeds or parse_seeds(setting("lorakit_grid_seeds")),
        weights=weights,
        baseline=baseline,
        steps=steps or setting("lorakit_grid_steps"),
        width=width or size,
        height=height or size,
        cfg_scale=cfg_scale,
    )
    xyz.checked_plan(**request, max_megapixels=shared.opts.img_max_size_mp)
    return request


def _grid(job: Job, request: dict) -> None:
    from lorakit_ext.webui import xyz

    job.set(phase="grid")
    result = xyz.run_epoch_grid(**request)
    job.set(grid=str(result.path), grid_cells=dict(result.cells))
    _note(job, f"grid saved to {result.path}")
    if job.run_dir:
        project = open_project(host.projects_root(), job.project)
        _suggest(job, suggestion.measured_report(project, Path(job.run_dir), result.cells))


def _suggest(job: Job, report: dict) -> None:
    job.set(suggestion=dict(report["suggestion"]))


# ---- front doors -------------------------------------------------------------------------------
def start_training(project: str, config: TrainConfig | None = None, *, resume: str | None = None, force: bool = False) -> str:
    """Queues a training job (or the resume of run ``resume``) in the background and returns its id
    at once. Every check that needs no model runs first, with the project's lock taken, so an unknown
    project, invalid settings, a busy project or a run that cannot resume raise :class:`UserError`
    before anything is queued; the job releases the lock when it ends."""
    prepared = training.prepare(project, config, resume=resume, force=force, by="HTTP API")
    job = new_job("train", project)
    spawn(job, lambda: _train_locked(job, prepared), on_end=prepared.lock.release)
    return job.id


def _train_locked(job: Job, prepared) -> None:
    # The lock goes before the job reads as ended, so a client that sees "finished" can start again.
    try:
        _train(job, prepared)
    except Interrupted:
        raise Interrupted("interrupted; the epochs saved so far are kept") from None
    finally:
        prepared.lock.release()


def start_grid(project: str, lora_names: list[str], *, trigger: str = "", **options) -> str:
    """Queues an epoch grid of ``lora_names`` (A1111 Lora names) and returns the job id; :class:`UserError`
    for a value out of its limits, before anything is queued. ``options`` are ``_grid_request``'s:
    prompt, negative, seeds, weights, baseline, steps, width, height, cfg_scale; unset ones come
    from the settings."""
    open_project(host.projects_root(), project)
    if not lora_names:
        raise UserError("name at least one LoRA for the grid")
    output_name = lora_names[0].rsplit("-", 1)[0] if "-" in lora_names[0] else lora_names[0]
    request = _grid_request(lora_names, trigger=trigger or output_name, output_name=output_name, **options)
    job = new_job("grid", project)
    spawn(job, lambda: _grid(job, request))
    return job.id


def train_in_gradio(id_task: str, project: str, config_json: str) -> tuple:
    """The body of the tab's Train button; wrap it with ``modules.call_queue.wrap_gradio_gpu_call``
    (which holds the queue lock and sets up ``shared.state``; the job's id is ``id_task``, so
    ``job_status(id_task)`` shows it while it runs).

    Returns ``(losses, files, grid, status_html)``: ``[[step, loss], …]``, the epoch file paths,
    the grid image path or None, and an HTML fragment saying how the job ended. The status comes
    last because ``wrap_gradio_gpu_call`` appends its timing HTML to the last output and, when a
    handler raises, returns ``extra_outputs + [error_html]``: pass ``extra_outputs=[[], [], None]``.
    """
    job = new_job("train", project, job_id=id_task)
    try:
        values = _json_object(config_json)
        resume = values.pop(RESUME_KEY, None)
        prepared = training.prepare(project, None if resume else TrainConfig.from_dict(values), resume=resume, by="the tab")
    except UserError as exc:
        job.set(status="failed", error=str(exc))
    else:
        _execute(job, lambda: _train_locked(job, prepared))
    data = job.to_dict()
    return data["losses"], data["files"], data["grid"], status_html(data)


def _json_object(text: str) -> dict:
    try:
        values = json.loads(text or "{}")
    except ValueError as exc:
        raise UserError(f"the training settings are not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise UserError("the training settings must be a JSON object of option: value")
    return values


def status_html(data: dict) -> str:
    """How a job ended (or stands), as an HTML fragment for the tab."""
    head = f"<b>{data['status'].capitalize()}</b>"
    if data["step"]:
        head += f": {data['step']} steps, epoch {data['epoch']}/{data['epochs']}"
        if data["loss"] is not None:
            head += f", last loss {data['loss']:.4f}"
    lines = [head]
    if data["error"]:
        lines.append(f"<span class='error'>{html.escape(data['error'])}</span>")
    if data["message"]:
        lines.append(html.escape(data["message"]))
    if data.get("suggestion"):
        lines.append(f"<b>{html.escape(data['suggestion']['reason'])}</b> (Compare tab: promote it or choose another)")
    lines += [html.escape(f) for f in data["files"]]
    if data["run_dir"]:
        lines.append(f"run record: {html.escape(data['run_dir'])}")
    return "<p>" + "<br>".join(lines) + "</p>"
