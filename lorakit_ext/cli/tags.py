"""``tags PROJECT [--dedupe] [--sort] [--remove T,...] [--search T,... --replace R --mode or|and]
[--trigger T] [--dry-run] [--counts [N]]``."""

from __future__ import annotations

from dataclasses import asdict

from lorakit_ext.cli.output import Result
from lorakit_ext.dataset.captions import load_captions
from lorakit_ext.dataset.curation import CurationSummary, apply_tag_ops
from lorakit_ext.dataset.tags import MODES, TagOps, tag_counts
from lorakit_ext.errors import UserError
from lorakit_ext.project import open_project

DEFAULT_TOP = 50


def register(sub, common) -> None:
    p = sub.add_parser(
        "tags",
        parents=[common],
        help="batch-curate caption tags, or count them",
        description="Runs the chosen operations on every caption in this order: dedupe, sort, "
        "remove, search & replace, trigger first. Running it twice changes nothing more. "
        "Without an operation it lists the most common tags.",
    )
    p.add_argument("project", help="an existing project")
    p.add_argument("--dedupe", action="store_true", help="remove repeated tags, keeping the first")
    p.add_argument("--sort", action="store_true", help="sort tags alphabetically")
    p.add_argument("--remove", default="", metavar="T,...", help="tags to remove")
    p.add_argument("--search", default="", metavar="T,...", help="tags to search for")
    p.add_argument("--replace", default="", metavar="R,...", help="tags that replace the searched ones")
    p.add_argument(
        "--mode",
        default="or",
        type=str.lower,
        choices=MODES,
        help="or: replace when any searched tag is present; and: only when all are (default: or)",
    )
    p.add_argument("--trigger", default="", metavar="T", help="activation tag(s) to put first in every caption")
    p.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    p.add_argument(
        "--counts",
        nargs="?",
        type=int,
        const=DEFAULT_TOP,
        metavar="N",
        help=f"list the N most common tags (default {DEFAULT_TOP}; 0 lists all)",
    )
    p.set_defaults(handler=run)


def _counts(captions: dict[str, str], top: int) -> tuple[list[dict], str]:
    counts = tag_counts(captions.values())
    shown = counts[:top] if top > 0 else counts
    header = f"{len(counts)} distinct tags in {len(captions)} captions" + (
        f"; top {len(shown)}:" if len(shown) < len(counts) else ":"
    )
    return [{"tag": t, "count": n} for t, n in shown], "\n".join([header, *(f"{n:5}  {t}" for t, n in shown)])


def _change_lines(changes, dry_run: bool) -> list[str]:
    if dry_run:
        return [line for c in changes for line in (c.name, f"  - {c.before}", f"  + {c.after}")]
    return [f"{c.name}: {c.after}" for c in changes]


def run(args) -> Result:
    if args.counts is not None and args.counts < 0:
        raise UserError(f"--counts must be 0 (all) or a positive number, not {args.counts}")
    project = open_project(args.root, args.project)
    ops = TagOps(
        dedupe=args.dedupe,
        sort=args.sort,
        remove=args.remove,
        search=args.search,
        replace=args.replace,
        mode=args.mode,
        trigger=args.trigger,
    )
    data: dict = {}
    lines: list[str] = []
    if ops.enabled:
        changes = apply_tag_ops(project, ops, dry_run=args.dry_run)
        summary = CurationSummary.of(changes, dry_run=args.dry_run)
        data["summary"] = asdict(summary)
        data["changes"] = [asdict(c) for c in changes]
        lines += [summary.text(), *_change_lines(changes, args.dry_run)]
    elif args.dry_run:
        raise UserError("--dry-run needs an operation (--dedupe, --sort, --remove, --search or --trigger)")
    if args.counts is not None or not ops.enabled:
        data["counts"], text = _counts(load_captions(project), DEFAULT_TOP if args.counts is None else args.counts)
        lines.append(text)
    return Result(data, "\n".join(lines))
