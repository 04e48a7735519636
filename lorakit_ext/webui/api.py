"""LoRA Kit's HTTP API under ``/lorakit/v1/``, mounted on A1111's FastAPI app.

Routes added in ``on_app_started`` get none of A1111's ``--api-auth``; every route here checks
it itself, the way A1111's own API does (HTTP Basic, users from ``user:password,…``). Errors are
JSON with a ``detail`` message: 400 for bad input (and a full disk, with the remedy), 403 for a
server path LoRA Kit may not use, 404 for an unknown project or job, 409 for a project another
operation holds, 501 for a part this install lacks; 422 (FastAPI's list of fields and messages)
for a number outside its range (:mod:`lorakit_ext.webui.limits`). The projects and datasets are
:mod:`lorakit_ext.webui.api_dataset`'s routes, the run queue :mod:`lorakit_ext.webui.api_queue`'s; here is the GPU work (train, grid, regularisation
images), queued through :mod:`lorakit_ext.webui.jobs`, which answers with a job id at once, and
promote.
"""

from __future__ import annotations

from pathlib import Path
from secrets import compare_digest
from typing import Any, Dict, List, Optional

import safetensors
from fastapi import APIRouter, Depends, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, conint

from lorakit_ext.compare.promote import promote as promote_epoch
from lorakit_ext.dataset.files import list_images
from lorakit_ext.errors import UserError
from lorakit_ext.export.card import sd_version_of
from lorakit_ext.project import confine, validate_name
from lorakit_ext.train.record import find_run_dir, list_runs
from lorakit_ext.train.plan import plan_for
from lorakit_ext.train.preflight import folder_counts
from lorakit_ext.webui import api_dataset, api_queue, host, jobs, limits, reg_drawing, suggestion, training
from lorakit_ext.webui.api_common import bounded, http_errors, named_project
from lorakit_ext.webui.ui_results import cell_for

PREFIX = "/lorakit/v1"
LATEST = "latest"

_basic = HTTPBasic(auto_error=False)


def require_auth(credentials: Optional[HTTPBasicCredentials] = Depends(_basic)) -> None:
    from modules import shared

    configured = getattr(shared.cmd_opts, "api_auth", None)
    if not configured:
        return
    users = dict(pair.split(":", 1) for pair in configured.split(",") if ":" in pair)
    if credentials is not None and credentials.username in users:
        # Bytes, so a non-ASCII password compares instead of raising.
        if compare_digest(credentials.password.encode(), users[credentials.username].encode()):
            return
    raise HTTPException(status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"})


router = APIRouter(prefix=PREFIX, dependencies=[Depends(require_auth)])
router.include_router(api_dataset.router)
router.include_router(api_queue.router)


def mount(app) -> None:
    """The ``on_app_started`` callback's work."""
    app.include_router(router)


def _job(job_id: str) -> Optional[str]:
    return None if job_id == LATEST else job_id


# ---- request bodies ---------------------------------------------------------------------------
Seed, LoraWeight, Steps, Size, Cfg, PreferredWeight = map(bounded, (
    limits.SEED, limits.LORA_WEIGHT, limits.GRID_STEPS, limits.GRID_SIZE, limits.GRID_CFG, limits.PREFERRED_WEIGHT,
))
# No upper bound: a long series is the user's to interrupt, and each image is kept as it comes.
ImageCount = conint(strict=True, ge=1)


class Settings(BaseModel):
    config: Dict[str, Any] = {}


class Grid(BaseModel):
    lora_names: List[str]
    prompt: Optional[str] = None
    trigger: str = ""
    negative: str = ""
    seeds: Optional[List[Seed]] = None
    weights: Optional[List[LoraWeight]] = None
    baseline: bool = True
    steps: Optional[Steps] = None
    width: Optional[Size] = None
    height: Optional[Size] = None
    cfg_scale: Cfg = 7.0


class RegImages(BaseModel):
    trigger: str = ""  # tags left out of the captions, comma-separated
    count: Optional[ImageCount] = None  # default: one per dataset image
    steps: Steps = reg_drawing.DEFAULT_STEPS
    seed: Optional[Seed] = None  # default: the training seed of the loaded model's family
    width: Optional[Size] = None  # default: the training resolution of the loaded model's family
    height: Optional[Size] = None


class Promote(BaseModel):
    epoch_file: str
    trigger: str = ""
    preferred_weight: PreferredWeight = 1.0
    description: str = ""
    remove_other_epochs: bool = False
    job_id: Optional[str] = None  # the training job: its files are the run's epochs
    grid_job_id: Optional[str] = None  # whose grid cell of this epoch becomes the preview (default: job_id)


# ---- training and jobs ------------------------------------------------------------------------
@router.post("/projects/{name}/plan")
@http_errors
def plan(name: str, body: Settings) -> dict:
    project = named_project(name)
    config = training.settings(body.config).validate()
    images = len(list_images(project.dataset))
    if not images:
        raise UserError(f"the dataset {project.dataset} has no images; import some first")
    return plan_for(config, images, *folder_counts(config, project.path)).to_dict()


@router.post("/projects/{name}/train", status_code=202)
@http_errors
def train(name: str, body: Settings) -> dict:
    project = named_project(name)
    return {"job_id": jobs.start_training(project.name, training.settings(body.config))}


class Resume(BaseModel):
    force: bool = False  # resume although the dataset or the loaded model changed


@router.get("/projects/{name}/runs")
@http_errors
def runs(name: str) -> dict:
    return {"runs": list_runs(named_project(name))}


@router.get("/projects/{name}/runs/{run_id}/epochs")
@http_errors
def epochs(name: str, run_id: str) -> dict:
    """Each epoch's validation loss and grid measures, and the suggested epoch with its reason."""
    return suggestion.saved_report(find_run_dir(named_project(name), validate_name(run_id, "run id")))


@router.post("/projects/{name}/runs/{run_id}/resume", status_code=202)
@http_errors
def resume(name: str, run_id: str, body: Resume) -> dict:
    project = named_project(name)
    return {"job_id": jobs.start_training(project.name, resume=validate_name(run_id, "run id"), force=body.force)}


@router.post("/projects/{name}/grid", status_code=202)
@http_errors
def grid(name: str, body: Grid) -> dict:
    project = named_project(name)
    options = body.dict() if not hasattr(body, "model_dump") else body.model_dump()
    lora_names, trigger = options.pop("lora_names"), options.pop("trigger")
    return {"job_id": jobs.start_grid(project.name, lora_names, trigger=trigger, **options)}


@router.post("/projects/{name}/reg-images", status_code=202)
@http_errors
def reg_images(name: str, body: RegImages) -> dict:
    """Regularisation images into the project's ``reg/``, drawn as the tab's button draws them."""
    project = named_project(name)
    # What the tab's form holds for the loaded model: its family's seed and resolution.
    form = training.settings({})
    drawing = reg_drawing.prepare(
        project, body.trigger, steps=body.steps, seed=form.seed if body.seed is None else body.seed,
        width=body.width or form.resolution, height=body.height or form.resolution, count=body.count, by="HTTP API",
    )
    return {"job_id": reg_drawing.start_job(drawing)}


@router.get("/jobs/{job_id}")
@http_errors
def job(job_id: str) -> dict:
    return jobs.job_status(_job(job_id))


@router.post("/jobs/{job_id}/interrupt")
@http_errors
def interrupt_job(job_id: str) -> dict:
    return {"interrupted": jobs.interrupt(_job(job_id))}


# ---- promote ---------------------------------------------------------------------------------
@router.post("/projects/{name}/promote")
@http_errors
def promote(name: str, body: Promote) -> dict:
    project = named_project(name)
    lora_dir = host.lora_dir()
    epoch_file = confine(lora_dir / body.epoch_file, host.lora_root())
    if epoch_file.suffix != ".safetensors" or not epoch_file.is_file():
        raise UserError(f"no LoRA file {body.epoch_file!r} in {lora_dir}")
    run_files = [Path(f) for f in jobs.job_status(body.job_id)["files"]] if body.job_id else []
    try:
        with safetensors.safe_open(str(epoch_file), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except (OSError, safetensors.SafetensorError) as exc:
        raise UserError(f"{epoch_file.name} is not a readable safetensors file: {exc}") from None
    grid_job = body.grid_job_id or body.job_id
    preview = cell_for(jobs.grid_cells(grid_job), epoch_file.stem, body.preferred_weight) if grid_job else None
    result = promote_epoch(
        project, lora_dir, epoch_file, trigger=body.trigger, preferred_weight=body.preferred_weight,
        description=body.description, sd_version=sd_version_of(metadata), preview=preview,
        remove_other_epochs=body.remove_other_epochs, run_files=run_files,
    )
    # Adds the new name to A1111's Lora list without clearing it (a full refresh outside the
    # queue lock could hide every LoRA from a generation running right now).
    host.networks_module().update_available_networks_by_names([Path(result.path).stem])
    removed = result.removed_batch
    return {
        "path": str(result.path),
        "card_path": str(result.card_path) if result.card_path else None,
        "preview_path": str(result.preview_path) if result.preview_path else None,
        "removed_batch": removed.to_dict() if removed is not None else None,
    }
