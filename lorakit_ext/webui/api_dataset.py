"""The HTTP API's projects and datasets: create, import, dedupe and undo, captions and tags. Work
on files only, answered at once; :mod:`lorakit_ext.webui.api` mounts these routes under its prefix
and authentication."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

from fastapi import APIRouter, File, UploadFile
from pydantic import BaseModel

from lorakit_ext.dataset.captions import read_captions, write_caption
from lorakit_ext.dataset.curation import CurationSummary, apply_tag_ops
from lorakit_ext.dataset.dedupe import DEFAULT_METHOD, apply_plan, plan_dedupe
from lorakit_ext.dataset.files import is_image_name, list_images
from lorakit_ext.dataset.images import DEFAULT_MAX_PIXELS
from lorakit_ext.dataset.importer import import_files, import_folder, sanitize_filename
from lorakit_ext.dataset.tags import TagOps, tag_counts
from lorakit_ext.dataset.trash import list_batches, undo
from lorakit_ext.errors import UserError
from lorakit_ext.project import Project, create_project, list_projects
from lorakit_ext.webui import host, limits
from lorakit_ext.webui.api_common import bounded, http_errors, named_project

router = APIRouter()

Megapixels = bounded(limits.IMPORT_MEGAPIXELS)


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


def _describe(project: Project) -> dict:
    folders = {key: str(getattr(project, key)) for key in ("path", "dataset", "removed", "runs")}
    return {"name": project.name, **folders, "images": len(list_images(project.dataset))}


@router.get("/projects")
@http_errors
def projects() -> dict:
    root = host.projects_root()
    return {"root": str(root), "projects": list_projects(root)}


@router.post("/projects")
@http_errors
def new_project(body: NewProject) -> dict:
    return _describe(create_project(host.projects_root(), body.name))


@router.get("/projects/{name}")
@http_errors
def show_project(name: str) -> dict:
    return _describe(named_project(name))


@router.post("/projects/{name}/import/folder")
@http_errors
def import_from_folder(name: str, body: FolderImport) -> dict:
    project = named_project(name)
    folder = host.check_path_access(body.folder, "import images from")
    return import_folder(project, folder, body.recursive, int(body.max_megapixels * 1e6)).to_dict()


@router.post("/projects/{name}/import/upload")
@http_errors
def import_upload(name: str, files: List[UploadFile] = File(...)) -> dict:
    project = named_project(name)
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
@http_errors
def dedupe(name: str, body: Dedupe) -> dict:
    project = named_project(name)
    # One process: forking the WebUI's server process (threads, CUDA) for a hashing pool is unsafe.
    plan = plan_dedupe(project, body.method, body.threshold, workers=1)
    batch = apply_plan(project, plan, body.keep) if body.apply and plan.clusters else None
    return {"plan": plan.to_dict(), "batch": batch.to_dict() if batch else None}


@router.get("/projects/{name}/batches")
@http_errors
def batches(name: str) -> dict:
    return {"batches": [b.to_dict() for b in list_batches(named_project(name))]}


@router.post("/projects/{name}/undo")
@http_errors
def undo_batch(name: str, body: Undo) -> dict:
    # Keep-last-N moves epoch files out of the Lora folder; their batches restore there.
    return {"batch": undo(named_project(name), body.batch, allowed_bases=(host.lora_root(),)).to_dict()}


@router.get("/projects/{name}/captions")
@http_errors
def captions(name: str) -> dict:
    reads = read_captions(named_project(name))
    return {"captions": {image: r.text for image, r in reads.items()}, "warnings": [r.warning for r in reads.values() if r.warning]}


@router.put("/projects/{name}/captions")
@http_errors
def set_captions(name: str, body: Captions) -> dict:
    project = named_project(name)
    images = {}
    for image_name in body.captions:
        image = project.dataset_file(image_name)
        if not (is_image_name(image) and image.is_file()):
            raise UserError(f"no image {image_name!r} in {project.dataset}; nothing was written")
        images[image_name] = image
    written = {n: write_caption(images[n], text, project=project).read_text(encoding="utf-8") for n, text in body.captions.items()}
    return {"captions": written}


@router.get("/projects/{name}/tags")
@http_errors
def tags(name: str) -> dict:
    reads = read_captions(named_project(name))
    return {"counts": [{"tag": t, "count": n} for t, n in tag_counts(r.text for r in reads.values())]}


@router.post("/projects/{name}/tags")
@http_errors
def edit_tags(name: str, body: Tags) -> dict:
    project = named_project(name)
    ops = TagOps(dedupe=body.dedupe, sort=body.sort, remove=body.remove, search=body.search,
                 replace=body.replace, mode=body.mode, trigger=body.trigger)
    changes = apply_tag_ops(project, ops, dry_run=body.dry_run)
    summary = CurationSummary.of(changes, dry_run=body.dry_run)
    return {"summary": asdict(summary), "text": summary.text(), "changes": [asdict(c) for c in changes]}
