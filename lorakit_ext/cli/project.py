"""``project create|list|show``."""

from __future__ import annotations

from lorakit_ext.cli.output import Result
from lorakit_ext.project import create_project, list_projects, open_project


def register(sub, common) -> None:
    p = sub.add_parser("project", parents=[common], help="create, list or show projects")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help_ in (("create", "create a project folder"), ("show", "show a project's folders")):
        a = actions.add_parser(action, parents=[common], help=help_)
        a.add_argument("name")
    actions.add_parser("list", parents=[common], help="list projects under the root")
    p.set_defaults(handler=run)


def run(args) -> Result:
    if args.action == "list":
        names = list_projects(args.root)
        return Result({"projects": names}, "\n".join(names) if names else f"no projects under {args.root}")
    project = create_project(args.root, args.name) if args.action == "create" else open_project(args.root, args.name)
    data = {
        "name": project.name,
        "path": str(project.path),
        "dataset": str(project.dataset),
        "removed": str(project.removed),
        "runs": str(project.runs),
    }
    return Result(data, "\n".join(f"{k:8} {v}" for k, v in data.items()))
