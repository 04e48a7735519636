"""``dedupe PROJECT``: show near-duplicate clusters (dry run) or move the extra copies to the trash."""

from __future__ import annotations

from lorakit_ext.cli.output import Result
from lorakit_ext.dataset.dedupe import DEFAULT_METHOD, DEFAULT_THRESHOLDS, METHODS, DedupePlan, apply_plan, plan_dedupe, resolve_keep
from lorakit_ext.dataset.similar import MAX_CROP
from lorakit_ext.errors import UserError
from lorakit_ext.project import open_project


def register(sub, common) -> None:
    p = sub.add_parser("dedupe", parents=[common], help="find near-duplicate images; --apply moves extra copies to _removed/")
    p.add_argument("project")
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help=f"perceptual hash (default {DEFAULT_METHOD}, the most reliable in bench dedupe --calibrate)")
    p.add_argument(
        "--threshold",
        type=int,
        default=None,
        help="largest Hamming distance that puts a pair forward as a possible copy; every pair is then "
        "confirmed by aligning the two images (default: "
        + ", ".join(f"{m} {t}" for m, t in DEFAULT_THRESHOLDS.items())
        + ")",
    )
    p.add_argument("--apply", action="store_true", help="move every image not kept, with its captions, to _removed/")
    p.add_argument("--keep", action="append", default=[], metavar="CLUSTER=FILENAME", help="keep this file in that cluster instead")
    p.add_argument("--workers", type=int, default=None, help="hashing processes (default: one per CPU for large sets)")
    p.set_defaults(handler=run)


def parse_keep(values: list[str]) -> dict[int, str]:
    overrides = {}
    for value in values:
        cluster, sep, name = value.partition("=")
        if not sep or not cluster.strip().isdigit() or not name:
            raise UserError(f"--keep {value!r} should look like 3=photo_01.png (cluster number = file name)")
        overrides[int(cluster)] = name
    return overrides


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def plan_text(plan: DedupePlan, keep: dict[int, str]) -> list[str]:
    how = f"{plan.method} ≤ {plan.threshold} bits or crops up to {MAX_CROP:.0%}, confirmed by alignment"
    if not plan.clusters:
        lines = [f"No near-duplicates among {plan.image_count} images ({how})."]
    else:
        lines = [f"{len(plan.clusters)} clusters of near-duplicates among {plan.image_count} images ({how}); * = kept:"]
    for c in plan.clusters:
        kept = keep[c.id]
        lines.append(f"cluster {c.id}:")
        for m in c.members:
            mark = "*" if m.name == kept else " "
            lines.append(f"  {mark} {m.name}  {m.width}×{m.height}  {_size(m.size)}  distance {m.distance}")
    for name, reason in plan.errors:
        lines.append(f"could not read {name}: {reason}")
    return lines


def run(args) -> Result:
    project = open_project(args.root, args.project)
    keep = parse_keep(args.keep)
    plan = plan_dedupe(project, args.method, args.threshold, args.workers)
    lines = plan_text(plan, resolve_keep(plan, keep))
    data = {"plan": plan.to_dict(), "batch": None}
    if plan.clusters and args.apply:
        batch = apply_plan(project, plan, keep)
        data["batch"] = batch.to_dict()
        images = sum(len(c["removed"]) for c in batch.extra["clusters"])
        lines += [
            f"Moved {images} images and {len(batch.files) - images} caption files to {batch.folder}.",
            f"Undo with: python -m lorakit_ext undo {project.name} {batch.id}",
        ]
    elif plan.clusters:
        lines.append(
            f"Dry run, nothing moved. Apply with: python -m lorakit_ext dedupe {project.name} --apply"
            " [--keep CLUSTER=FILENAME …]"
        )
    return Result(data, "\n".join(lines), ok=not plan.errors)
