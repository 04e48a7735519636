"""Batch tag curation over a project's captions: plan the changes, then write only those."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from lorakit_ext.dataset.captions import read_captions, write_caption
from lorakit_ext.dataset.tags import TagOps, curate, split_tags, tag_key
from lorakit_ext.errors import UserError
from lorakit_ext.project import Project


@dataclass(frozen=True)
class CaptionChange:
    name: str
    before: str
    after: str
    # True when the image had no caption file: the change creates one.
    created: bool = False


@dataclass(frozen=True)
class CurationSummary:
    changed: int
    created: int
    tags_added: int
    tags_removed: int
    dry_run: bool

    @classmethod
    def of(cls, changes: Iterable[CaptionChange], dry_run: bool = False) -> CurationSummary:
        changed = created = added = removed = 0
        for change in changes:
            # Counted with repeats, so a removed duplicate counts as a removed tag.
            before = Counter(tag_key(t) for t in split_tags(change.before))
            after = Counter(tag_key(t) for t in split_tags(change.after))
            changed += 1
            created += change.created
            added += sum((after - before).values())
            removed += sum((before - after).values())
        return cls(changed, created, added, removed, dry_run)

    def text(self) -> str:
        verb = "would change" if self.dry_run else "changed"
        line = f"{verb} {self.changed} caption(s)"
        if self.created:
            line += f" ({self.created} new caption file(s))"
        return f"{line}: {self.tags_added} tag(s) added, {self.tags_removed} removed"


def plan_tag_ops(project: Project, ops: TagOps) -> list[CaptionChange]:
    """The captions ``ops`` would change, in image name order; nothing is written."""
    if not ops.enabled:
        raise UserError("no tag operation chosen; pick at least one (dedupe, sort, remove, search, trigger)")
    changes = []
    for name, read in read_captions(project).items():
        after = curate(read.text, ops)
        if after != read.text:
            changes.append(CaptionChange(name, read.text, after, created=read.source is None))
    return changes


def apply_tag_ops(project: Project, ops: TagOps, dry_run: bool = False) -> list[CaptionChange]:
    """Runs ``ops`` on every caption and writes the changed ones atomically (unchanged files are
    not touched); returns the changes. A caption read from a ``.caption`` file is written to
    ``.txt``."""
    changes = plan_tag_ops(project, ops)
    if not dry_run:
        for change in changes:
            image = project.dataset_file(change.name)
            write_caption(image, change.after, project=project)
    return changes
