"""LoRA Kit's HTTP API under ``/lorakit/v1/``, mounted on A1111's FastAPI app.

Routes added in ``on_app_started`` get none of A1111's ``--api-auth``; every route here checks
it itself, the way A1111's own API does (HTTP Basic, users from ``user:password,…``). Errors are
JSON with a ``detail`` message: 400 for bad input (and a full disk, with the remedy), 403 for a
server path LoRA Kit may not use, 404 for an unknown project or job, 409 for a project another
operation holds, 501 for a part this install lacks; 422 (FastAPI's list of fields and messages)
for a number outside its range (:mod:`lorakit_ext.webui.limits`). GPU work (train, grid) is
queued through :mod:`lorakit_ext.webui.jobs` and answers with a job id at once.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from secrets import compare_digest
from typing import Any, Dict, List, Optional

import safetensors
from fastapi import APIRouter, Depends, File, HTTPException, UploadFile
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, confloat, conint

from lorakit_ext.compare.promote import promote as promote_epoch
from lorakit_ext.dataset.captions import read_captions, write_caption
from lorakit_ext.dataset.curation import CurationSummary, apply_tag_ops
from lorakit_ext.dataset.dedupe import DEFAULT_METHOD, apply_plan, plan_dedupe
from lorakit_ext.dataset.files import is_image_name, list_images
from lorakit_ext.dataset.images import DEFAULT_MAX_PIXELS
from lorakit_ext.dataset.importer import import_files, import_folder, sanitize_filename
from lorakit_ext.dataset.tags import TagOps, tag_counts
from lorakit_ext.dataset.trash import list_batches, undo
from lorakit_ext.errors import UserError
from lorakit_ext.failures import as_user_error
from lorakit_ext.export.card import sd_version_of
from lorakit_ext.project import Project, confine, create_project, list_projects, open_project, validate_name
from lorakit_ext.project_lock import ProjectBusy
from lorakit_ext.train.record import find_run_dir, list_runs
from lorakit_ext.train.plan import plan_for
from lorakit_ext.train.preflight import folder_counts
from lorakit_ext.webui import host, jobs, limits, suggestion, training
from lorakit_ext.webui.ui_results import cell_for

PREFIX = "/lorakit/v1"
LATEST = "latest"


class ProjectNotFound(UserError):
    """404 rather than 400: the name is fine, there is just no such project."""


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


def mount(app) -> None:
    """The ``on_app_started`` callback's work."""
    app.include_router(router)


def _errors(handler):
    """Maps LoRA Kit's errors to HTTP statuses; anything else is A1111's 500."""

    @functools.wraps(handler)
    def run(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except (ProjectNotFound, jobs.UnknownJob) as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        except host.PathAccessDenied as exc:
            raise HTTPException(status_code=403, detail=str(exc)) from None
        except ProjectBusy as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None
        except host.FeatureMissing as exc:
            raise HTTPException(status_code=501, detail=str(exc)) from None
        except UserError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        except (OSError, MemoryError, OverflowError) as exc:
            # Disk full, permissions, numbers too large: the user's to fix, so a 4xx with the remedy.
            known = as_user_error(exc)
            if known is None:
                raise
            raise HTTPException(status_code=400, detail=str(known)) from None

    return run


def _project(name: str) -> Project:
    root = host.projects_root()
    name = validate_name(name)
    if not (root / name / "dataset").is_dir():
        raise ProjectNotFound(f"no project {name!r} in {root}")
    return open_project(root, name)


def _describe(project: Project) -> dict:
    folders = {key: str(getattr(project, key)) for key in ("path", "dataset", "removed", "runs")}
    return {"name": project.name, **folders, "images": len(list_images(project.dataset))}


def _job(job_id: str) -> Optional[str]:
    return None if job_id == LATEST else job_id


# ---- request bodies (fields only, so pydantic 1.10 and 2 read them alike) ---------------------
def _number(limit: limits.Limit):
    """A field type within ``limit``, the tab's own range: pydantic answers 422 naming the field
    for NaN, ±Infinity, 1e999 and anything out of range, before a handler runs or a job queues.
    Whole numbers are strict, or pydantic would quietly cut a seed of 1.5 to 1."""
    if limit.whole:
        return conint(strict=True, ge=limit.minimum, le=limit.maximum, multiple_of=limit.step)
    return confloat(ge=limit.minimum, le=limit.maximum)


Megapixels, Seed, LoraWeight, Steps, Size, Cfg, PreferredWeight = map(_number, (
    limits.IMPORT_MEGAPIXELS, limits.SEED, limits.LORA_WEIGHT, limits.GRID_STEPS, limits.GRID_SIZE, limits.GRID_CFG,
    limits.PREFERRED_WEIGHT,
))


class NewProject(BaseModel):
    name: str


class FolderImport(BaseModel):
    folder: str
    recursive: bool = False
    max_megapixels: Megapixels = DEFAULT_MAX_PIXELS / 1e6


class Dedupe(BaseModel):
    method: str = DEFAULT_METHOD
    threshold: Optional[int] = None
    apply: bool = False
    keep: Dict[int, str] = {}


class Undo(BaseModel):
    batch: Optional[str] = None


class Captions(BaseModel):
    captions: Dict[str, str]


class Tags(BaseModel):
    dedupe: bool = False
    sort: bool = False
    remove: List[str] = []
    search: List[str] = []
    replace: List[str] = []
    mode: str = "or"
    trigger: List[str] = []
    dry_run: bool = False


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


class Promote(BaseModel):
    epoch_file: str
    trigger: str = ""
    preferred_weight: PreferredWeight = 1.0
    description: str = ""
    remove_other_epochs: bool = False
    job_id: Optional[str] = None  # the training job: its files are the run's epochs
    grid_job_id: Optional[str] = None  # whose grid cell of this epoch becomes the preview (default: job_id)


# ---- projects and datasets --------------------------------------------------------------------
@router.get("/projects")
@_errors
def projects() -> dict:
    root = host.projects_root()
    return {"root": str(root), "projects": list_projects(root)}


@router.post("/projects")
@_errors
def new_project(body: NewProject) -> dict:
    return _describe(create_project(host.projects_root(), body.name))


@router.get("/projects/{name}")
@_errors
def show_project(name: str) -> dict:
    return _describe(_project(name))


@router.post("/projects/{name}/import/folder")
@_errors
def import_from_folder(name: str, body: FolderImport) -> dict:
    project = _project(name)
    folder = host.check_path_access(body.folder, "import images from")
    return import_folder(project, folder, body.recursive, int(body.max_megapixels * 1e6)).to_dict()


@router.post("/projects/{name}/import/upload")
@_errors
def import_upload(name: str, files: List[UploadFile] = File(...)) -> dict:
    project = _project(name)
    with tempfile.TemporaryDirectory(prefix="lorakit-upload-") as tmp:
        paths, names = [], []
        for index, upload in enumerate(files):
            original = upload.filename or f"upload-{index}"
            # The importer reads the temporary file and names the copy after the browser's name.
            path = Path(tmp) / f"{index:05d}{Path(sanitize_filename(original)).suffix}"
            with open(path, "wb") as fh:
                shutil.copyfileobj(upload.file, fh)
            paths.append(path)
            names.append(original)
        return import_files(project, paths, names).to_dict()


@router.post("/projects/{name}/dedupe")
@_errors
def dedupe(name: str, body: Dedupe) -> dict:
    project = _project(name)
    # One process: forking the WebUI's server process (threads, CUDA) for a hashing pool is unsafe.
    plan = plan_dedupe(project, body.method, body.threshold, workers=1)
    batch = apply_plan(project, plan, body.keep) if body.apply and plan.clusters else None
    return {"plan": plan.to_dict(), "batch": batch.to_dict() if batch else None}


@router.get("/projects/{name}/batches")
@_errors
def batches(name: str) -> dict:
    return {"batches": [b.to_dict() for b in list_batches(_project(name))]}


@router.post("/projects/{name}/undo")
@_errors
def undo_batch(name: str, body: Undo) -> dict:
    # Keep-last-N moves epoch files out of the Lora folder; their batches restore there.
    return {"batch": undo(_project(name), body.batch, allowed_bases=(host.lora_root(),)).to_dict()}


@router.get("/projects/{name}/captions")
@_errors
def captions(name: str) -> dict:
    reads = read_captions(_project(name))
    return {"captions": {image: r.text for image, r in reads.items()}, "warnings": [r.warning for r in reads.values() if r.warning]}


@router.put("/projects/{name}/captions")
@_errors
def set_captions(name: str, body: Captions) -> dict:
    project = _project(name)
    images = {}
    for image_name in body.captions:
        image = project.dataset_file(image_name)
        if not (is_image_name(image) and image.is_file()):
            raise UserError(f"no image {image_name!r} in {project.dataset}; nothing was written")
        images[image_name] = image
    written = {n: write_caption(images[n], text, project=project).read_text(encoding="utf-8") for n, text in body.captions.items()}
    return {"captions": written}


@router.get("/projects/{name}/tags")
@_errors
def tags(name: str) -> dict:
    reads = read_captions(_project(name))
    return {"counts": [{"tag": t, "count": n} for t, n in tag_counts(r.text for r in reads.values())]}


@router.post("/projects/{name}/tags")
@_errors
def edit_tags(name: str, body: Tags) -> dict:
    project = _project(name)
    ops = TagOps(dedupe=body.dedupe, sort=body.sort, remove=body.remove, search=body.search,
                 replace=body.replace, mode=body.mode, trigger=body.trigger)
    changes = apply_tag_ops(project, ops, dry_run=body.dry_run)
    summary = CurationSummary.of(changes, dry_run=body.dry_run)
    return {"summary": asdict(summary), "text": summary.text(), "changes": [asdict(c) for c in changes]}


# ---- training and jobs ------------------------------------------------------------------------
@router.post("/projects/{name}/plan")
@_errors
def plan(name: str, body: Settings) -> dict:
    project = _project(name)
    config = training.settings(body.config).validate()
    images = len(list_images(project.dataset))
    if not images:
        raise UserError(f"the dataset {project.dataset} has no images; import some first")
    return plan_for(config, images, *folder_counts(config, project.path)).to_dict()


@router.post("/projects/{name}/train", status_code=202)
@_errors
def train(name: str, body: Settings) -> dict:
    project = _project(name)
    return {"job_id": jobs.start_training(project.name, training.settings(body.config))}


class Resume(BaseModel):
    force: bool = False  # resume although the dataset or the loaded model changed


@router.get("/projects/{name}/runs")
@_errors
def runs(name: str) -> dict:
    return {"runs": list_runs(_project(name))}


@router.get("/projects/{name}/runs/{run_id}/epochs")
@_errors
def epochs(name: str, run_id: str) -> dict:
    """Each epoch's validation loss and grid measures, and the suggested epoch with its reason."""
    return suggestion.saved_report(find_run_dir(_project(name), validate_name(run_id, "run id")))


@router.post("/projects/{name}/runs/{run_id}/resume", status_code=202)
@_errors
def resume(name: str, run_id: str, body: Resume) -> dict:
    project = _project(name)
    return {"job_id": jobs.start_training(project.name, resume=validate_name(run_id, "run id"), force=body.force)}


@router.post("/projects/{name}/grid", status_code=202)
@_errors
def grid(name: str, body: Grid) -> dict:
    project = _project(name)
    options = body.dict() if not hasattr(body, "model_dump") else body.model_dump()
    lora_names, trigger = options.pop("lora_names"), options.pop("trigger")
    return {"job_id": jobs.start_grid(project.name, lora_names, trigger=trigger, **options)}


@router.get("/jobs/{job_id}")
@_errors
def job(job_id: str) -> dict:
    return jobs.job_status(_job(job_id))


@router.post("/jobs/{job_id}/interrupt")
@_errors
def interrupt_job(job_id: str) -> dict:
    return {"interrupted": jobs.interrupt(_job(job_id))}


# ---- promote ---------------------------------------------------------------------------------
@router.post("/projects/{name}/promote")
@_errors
def promote(name: str, body: Promote) -> dict:
    project = _project(name)
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
