"""What every route of LoRA Kit's HTTP API (:mod:`lorakit_ext.webui.api`) shares: errors as HTTP
statuses, the project a path names, and bounded number fields for request bodies."""

from __future__ import annotations

import functools
import inspect

from fastapi import HTTPException
from pydantic import confloat, conint

from lorakit_ext.errors import UserError
from lorakit_ext.failures import as_user_error
from lorakit_ext.project import Project, open_project, validate_name
from lorakit_ext.project_lock import ProjectBusy
from lorakit_ext.webui import host, jobs, limits


class ProjectNotFound(UserError):
    """404 rather than 400: the name is fine, there is just no such project."""


def http_errors(handler):
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

    # FastAPI evaluates string annotations in the wrapper's module, which knows none of the
    # handler's body types: hand it the handler's signature with its annotations evaluated.
    run.__signature__ = inspect.signature(handler, eval_str=True)
    return run


def named_project(name: str) -> Project:
    root = host.projects_root()
    name = validate_name(name)
    if not (root / name / "dataset").is_dir():
        raise ProjectNotFound(f"no project {name!r} in {root}")
    return open_project(root, name)


# Request bodies declare fields only, so pydantic 1.10 and 2 read them alike.
def bounded(limit: limits.Limit):
    """A field type within ``limit``, the tab's own range: pydantic answers 422 naming the field
    for NaN, ±Infinity, 1e999 and anything out of range, before a handler runs or a job queues.
    Whole numbers are strict, or pydantic would quietly cut a seed of 1.5 to 1."""
    if limit.whole:
        return conint(strict=True, ge=limit.minimum, le=limit.maximum, multiple_of=limit.step)
    return confloat(ge=limit.minimum, le=limit.maximum)
