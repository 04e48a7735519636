"""Rows and one-line summaries the tab shows for library results. Pure: no gradio, no A1111.

A table goes to a Dataframe as :func:`table` builds it: a bare empty list would make gradio 3
replace the column names with numbers.
"""

from __future__ import annotations

from pathlib import Path

from lorakit_ext.dataset.curation import CaptionChange, CurationSummary
from lorakit_ext.dataset.dedupe import Cluster, DedupePlan, Member
from lorakit_ext.dataset.importer import ImportReport
from lorakit_ext.dataset.tags import LintReport, join_tags
from lorakit_ext.dataset.trash import RemovalBatch

IMPORT_HEADERS = ("result", "file", "details")
BATCH_HEADERS = ("batch", "created (UTC)", "files", "reason", "state")
TAG_HEADERS = ("tag", "captions")
LINT_HEADERS = ("image", "problem")
CHANGE_HEADERS = ("image", "before", "after")
KEEP_MARK = "★"


def table(headers, rows: list[list]) -> dict:
    """The value form gradio 3 and 4 Dataframes both take, column names kept when there are no rows."""
    return {"headers": list(headers), "data": rows}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def file_size(size: int) -> str:
    """``512 B``, ``12.3 KiB``, ``4.5 MiB``: a small file is not "0 KiB"."""
    if size < 1024:
        return f"{size} B"
    if size < 1024**2:
        return f"{size / 1024:.1f} KiB"
    return f"{size / 1024**2:.1f} MiB"


def import_rows(report: ImportReport) -> list[list[str]]:
    rows = []
    for f in report.imported:
        details = [f"as {Path(f.dest).name}"]
        if f.renamed_from:
            details.append(f"renamed: {f.renamed_from} was taken")
        if f.converted_reason:
            details.append(f"converted to PNG: {f.converted_reason}")
        if f.captions:
            details.append("caption " + ", ".join(Path(c).name for c in f.captions))
        rows.append(["imported", f.source, "; ".join(details)])
    rows += [["skipped", k.source, k.reason] for k in report.skipped]
    rows += [["rejected", r.source, r.reason] for r in report.rejected]
    return rows


def import_summary(report: ImportReport) -> str:
    captioned = sum(1 for f in report.imported if f.captions)
    text = f"Imported {_plural(len(report.imported), 'image')} ({captioned} with captions)"
    if report.skipped:
        text += f"; skipped {_plural(len(report.skipped), 'file')} already in the dataset or behind a link (listed below)"
    if report.rejected:
        text += f"; rejected {_plural(len(report.rejected), 'file')} (reasons below)"
    return text + "."


def batch_rows(batches: list[RemovalBatch]) -> list[list[str]]:
    """Newest first: the one an undo restores is on top."""
    return [
        [b.id, b.created.replace("T", " ").rstrip("Z")[:19], str(len(b.files)), b.reason, "restored" if b.restored else "removed"]
        for b in reversed(batches)
    ]


def member_caption(member: Member, keep: str) -> str:
    """Short enough for a thumbnail: the kept one starred, then what decides which to keep."""
    mark = f"{KEEP_MARK} " if member.name == keep else ""
    return f"{mark}{member.name} · {member.width}×{member.height} · {file_size(member.size)}"


def cluster_label(cluster: Cluster, keep: str) -> str:
    farthest = max(m.distance for m in cluster.members)
    return f"Cluster {cluster.id}: {_plural(len(cluster.members), 'image')} up to {farthest} bits apart, keeping {keep} (★)"


def resolved_keep(plan: DedupePlan, overrides: dict[int, str]) -> dict[int, str]:
    """Cluster id → kept file: the user's pick where there is one, else the plan's."""
    return {c.id: overrides.get(c.id, c.keep) for c in plan.clusters}


def _how(plan: DedupePlan) -> str:
    return f"{plan.method} ≤ {plan.threshold} bits or crops up to 10 %, each pair confirmed by aligning the two images"


def dedupe_summary(plan: DedupePlan, overrides: dict[int, str]) -> str:
    if not plan.clusters:
        text = f"No near-duplicates among {_plural(plan.image_count, 'image')} ({_how(plan)})."
    else:
        moving = sum(len(c.members) - 1 for c in plan.clusters)
        changed = sum(1 for c in plan.clusters if overrides.get(c.id, c.keep) != c.keep)
        text = (
            f"{_plural(len(plan.clusters), 'cluster')} of near-duplicates among {_plural(plan.image_count, 'image')} "
            f"({_how(plan)}). Apply moves {_plural(moving, 'image')} and their captions "
            f"to _removed/ (undo brings them back)."
        )
        if changed:
            text += f" Your pick replaces the suggested keeper in {_plural(changed, 'cluster')}."
    if plan.errors:
        text += " Not hashed: " + "; ".join(f"{name} ({reason})" for name, reason in plan.errors)
    return text


def page_bounds(count: int, page: int, per_page: int) -> tuple[int, int, int, int]:
    """``(start, end, page, pages)`` for a 0-based ``page`` clamped into range."""
    pages = max(1, -(-count // per_page))
    page = min(max(0, page), pages - 1)
    start = page * per_page
    return start, min(count, start + per_page), page, pages


def tag_count_rows(counts: list[tuple[str, int]], top: int = 0) -> list[list]:
    shown = counts[:top] if top > 0 else counts
    return [[tag, n] for tag, n in shown]


def lint_rows(report: LintReport) -> list[list[str]]:
    trigger = join_tags(report.trigger)
    how = "" if report.token_count_exact else " (estimate: no CLIP tokenizer)"
    rows = [[name, "empty caption"] for name in report.empty]
    rows += [[name, f"missing the trigger {trigger!r}"] for name in report.missing_trigger]
    rows += [[name, "trigger not first (tag shuffling would move it)"] for name in report.trigger_not_first]
    rows += [[name, f"{count} CLIP tokens, over {report.max_tokens}{how}"] for name, count in report.too_long]
    return rows


def lint_summary(report: LintReport) -> str:
    if report.ok:
        how = "exact CLIP token counts" if report.token_count_exact else "estimated CLIP token counts"
        return f"{_plural(report.captions, 'caption')} checked: no problems ({how})."
    problems = len(report.empty) + len(report.missing_trigger) + len(report.trigger_not_first) + len(report.too_long)
    return f"{_plural(report.captions, 'caption')} checked: {_plural(problems, 'problem')}."


def change_rows(changes: list[CaptionChange]) -> list[list[str]]:
    return [[c.name, c.before if not c.created else "(no caption file)", c.after] for c in changes]


def change_summary(changes: list[CaptionChange], dry_run: bool) -> str:
    if not changes:
        return "No caption would change." if dry_run else "No caption changed."
    return CurationSummary.of(changes, dry_run=dry_run).text().capitalize() + "."
