"""``project create|list|show``."""

from __future__ import annotations

from lorakit_ext.cli.output import Result
from lorakit_ext.errors import UserError
from lorakit_ext.project import create_project, list_projects, open_project


def register(sub, common) -> None:
    # One flat parser: nested sub-parsers would re-default --root/--json given before the action.
    p = sub.add_parser("project", parents=[common], help="create, list or show projects")
    p.add_argument("action", choices=("create", "list", "show"))
    p.add_argument("name", nargs="?", help="project name (create, show)")
    p.set_defaults(handler=run)


def run(args) -> Result:
    if args.action == "list":
        names = list_projects(args.root)
        return Result({"projects": names}, "\n".join(names) if names else f"no projects under {args.root}")
    if not args.name:
        raise UserError(f"project {args.action} needs a NAME")
    project = create_project(args.root, args.name) if args.action == "create" else open_project(args.root, args.name)
    data = {
        "name": project.name,
        "path": str(project.path),
        "dataset": str(project.dataset),
        "removed": str(project.removed),
        "runs": str(project.runs),
    }
    return Result(data, "\n".join(f"{k:8} {v}" for k, v in data.items()))
