"""``import PROJECT SOURCE... [--recursive] [--max-megapixels 80]``."""

from __future__ import annotations

from pathlib import Path

from lorakit_ext.cli.output import Result
from lorakit_ext.dataset.images import DEFAULT_MAX_PIXELS, MAX_MEGAPIXELS
from lorakit_ext.dataset.importer import ImportReport, collect_files, collect_folder, import_candidates
from lorakit_ext.errors import UserError
from lorakit_ext.project import Project, open_project

# How many reasons the one-line error quotes when every file was rejected.
QUOTED_REASONS = 5


def register(sub, common) -> None:
    p = sub.add_parser(
        "import",
        parents=[common],
        help="validate images and copy them into a project's dataset",
        description="Copies images (and same-stem .txt/.caption files) into PROJECT/dataset. "
        "Corrupt, truncated, oversized and ambiguous files are rejected with a reason; files the "
        "dataset already holds and symlinked sub-folders are skipped and listed; "
        "nothing is overwritten and the sources are never modified.",
    )
    p.add_argument("project", metavar="PROJECT", help="an existing project (create it with: project create NAME)")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="a folder of images, or image files")
    p.add_argument("--recursive", action="store_true", help="include images in sub-folders of a SOURCE folder")
    p.add_argument(
        "--max-megapixels",
        type=float,
        default=DEFAULT_MAX_PIXELS / 1e6,
        help="reject images larger than this many megapixels (default: %(default)g)",
    )
    p.set_defaults(handler=run)


def _collect(project: Project, sources: list[str], recursive: bool) -> list:
    """All candidates, so a missing or empty SOURCE stops the command before anything is copied."""
    candidates, files = [], []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            candidates += collect_folder(project, path, recursive)
        elif path.exists() or path.is_symlink():
            files.append(path)
        else:
            raise UserError(f"{source} does not exist; give a folder of images or image files")
    return candidates + (collect_files(project, files) if files else [])


def _nothing_imported(report: ImportReport) -> str:
    problems = [*report.rejected, *report.skipped]
    quoted = "; ".join(f"{r.source}: {r.reason}" for r in problems[:QUOTED_REASONS])
    more = len(problems) - QUOTED_REASONS
    return f"none of the {len(report.rejected)} files could be imported: {quoted}" + (
        f"; and {more} more" if more > 0 else ""
    )


def _text(report: ImportReport, dataset: Path) -> str:
    converted = [f for f in report.imported if f.converted_reason]
    renamed = [f for f in report.imported if f.renamed_from]
    captions = sum(len(f.captions) for f in report.imported)
    skipped = f", skipped {len(report.skipped)}" if report.skipped else ""
    lines = [
        f"imported {len(report.imported)}, rejected {len(report.rejected)}{skipped} "
        f"({len(converted)} converted to PNG, {len(renamed)} renamed, {captions} caption files)"
    ]
    lines += [f"rejected {r.source}: {r.reason}" for r in report.rejected]
    lines += [f"skipped {k.source}: {k.reason}" for k in report.skipped]
    lines.append(f"saved to {dataset}")
    lines += [f"converted {f.source} -> {f.dest.name}: {f.converted_reason}" for f in converted]
    lines += [f"renamed {f.source} -> {f.dest.name}" for f in renamed]
    return "\n".join(lines)


def run(args) -> Result:
    if not 0 < args.max_megapixels < MAX_MEGAPIXELS:
        raise UserError(f"--max-megapixels must be a number above 0 and below {MAX_MEGAPIXELS:g}, not {args.max_megapixels:g}")
    project = open_project(args.root, args.project)
    candidates = _collect(project, args.sources, args.recursive)
    report = import_candidates(project, candidates, int(args.max_megapixels * 1e6))
    # Importing a folder again adds nothing and is no error: its images are all there already.
    if not report.imported and not any(k.duplicate_of for k in report.skipped):
        raise UserError(_nothing_imported(report))
    data = {"project": project.name, "dataset": str(project.dataset), **report.to_dict()}
    return Result(data, _text(report, project.dataset))
