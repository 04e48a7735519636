"""``undo PROJECT [BATCH]``: put the newest (or the named) batch from ``_removed/`` back."""

from __future__ import annotations

from pathlib import Path

from lorakit_ext.cli.output import Result
from lorakit_ext.dataset.trash import list_batches, undo
from lorakit_ext.project import open_project


def register(sub, common) -> None:
    p = sub.add_parser("undo", parents=[common], help="restore files that dedupe or other tools moved to _removed/")
    p.add_argument("project")
    p.add_argument("batch", nargs="?", default=None, help="batch id (default: the newest not yet restored)")
    p.add_argument("--list", action="store_true", help="list the batches instead")
    p.add_argument(
        "--allow",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="also restore into DIR, for batches taken from outside the project (e.g. A1111's Lora folder)",
    )
    p.set_defaults(handler=run)


def run(args) -> Result:
    project = open_project(args.root, args.project)
    if args.list:
        batches = list_batches(project)
        lines = [
            f"{b.id}  {'restored' if b.restored else 'removed '}  {len(b.files):4} files  {b.reason}" for b in batches
        ]
        return Result({"batches": [b.to_dict() for b in batches]}, "\n".join(lines) or f"no batches in {project.removed}")
    batch = undo(project, args.batch, args.allow)
    lines = [f"Restored {len(batch.files)} files from batch {batch.id}:"] + [f"  {f.original_path}" for f in batch.files]
    return Result({"batch": batch.to_dict()}, "\n".join(lines))
