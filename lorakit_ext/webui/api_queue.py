"""The run queue over HTTP: ``POST /lorakit/v1/projects/{name}/queue`` adds a training of one of
A1111's checkpoints to the queue (:mod:`lorakit_ext.run_queue`), ``GET /lorakit/v1/queue`` lists it
and ``POST /lorakit/v1/queue/{entry}/cancel`` takes an entry out.

Queued runs train headless, each in its own process, when ``python -m lorakit_ext queue run`` runs
on this machine (A1111's own model and its GPU work stay as they are), into A1111's Lora folder.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

from fastapi import APIRouter
from pydantic import BaseModel

from lorakit_ext.errors import UserError
from lorakit_ext.run_queue import add_entry, cancel_entry, list_entries
from lorakit_ext.webui import host
from lorakit_ext.webui.api_common import http_errors, named_project

router = APIRouter()


class Queued(BaseModel):
    config: Dict[str, Any] = {}  # over the checkpoint's family defaults, as `train --config`
    checkpoint: Optional[str] = None  # one of A1111's checkpoints (title or name); default: the one loaded


def _checkpoint_file(name: Optional[str]) -> str:
    from modules import sd_models

    if name is None:
        model = host.model_in_memory()
        info = getattr(model, "sd_checkpoint_info", None)
        if info is None or not getattr(info, "filename", None):
            raise UserError("no checkpoint is loaded; name one in `checkpoint`")
        return info.filename
    info = sd_models.get_closet_checkpoint_match(name)
    if info is None:
        raise UserError(f"A1111 knows no checkpoint {name!r}; use a title from /sdapi/v1/sd-models")
    return info.filename


@router.post("/projects/{name}/queue", status_code=201)
@http_errors
def queue(name: str, body: Queued) -> dict:
    from modules import paths

    from lorakit_ext.models.checkpoint import family_of_checkpoint
    from lorakit_ext.train_config import TrainConfig

    project = named_project(name)
    checkpoint = _checkpoint_file(body.checkpoint)
    family = family_of_checkpoint(checkpoint)
    # Checked now with the defaults the run will have: a queue left running should not meet a typo.
    TrainConfig.from_sources(family.defaults, body.config).validate()
    # Into A1111's Lora folder, as the tab's runs: the user finds the epochs where A1111 lists them.
    argv = ["train", project.name, "--root", str(project.root), "--base-model", checkpoint, "--out", str(host.lora_dir()),
            "--config", "{entry}/config.json", "--a1111-dir", str(paths.script_path)]
    entry = add_entry(project.root, project.name, argv, {"config.json": json.dumps(body.config)})
    return {"entry": entry}


@router.get("/queue")
@http_errors
def entries() -> dict:
    return {"entries": list_entries(host.projects_root())}


@router.post("/queue/{entry_id}/cancel")
@http_errors
def cancel(entry_id: str) -> dict:
    return {"entry": cancel_entry(host.projects_root(), entry_id)}
