"""The one way LoRA Kit removes a file: move it into ``_removed/<batch>/`` with a manifest.

Nothing is ever deleted. A batch folder holds the moved files under their own names plus
``manifest.json`` (where each came from, its sha256 and size, why it was removed). :func:`undo`
puts a batch back byte for byte and renames the folder to ``<id>.restored`` so a second undo
cannot restore it twice.

The manifest is written *before* the first move: if the process dies half way, every file is
either still in place or in a batch whose manifest knows where it belongs, and undo handles both.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from lorakit_ext.errors import UserError
from lorakit_ext.fsutil import atomic_write_json, free_name, move_no_clobber
from lorakit_ext.project import Project, confine
from lorakit_ext.project_lock import holding_lock

MANIFEST = "manifest.json"
RESTORED_SUFFIX = ".restored"
_ID_FORMAT = "%Y%m%d-%H%M%S-%f"


@dataclass(frozen=True)
class RemovedFile:
    original_path: str
    stored_name: str
    sha256: str
    size: int
    reason: str


@dataclass
class RemovalBatch:
    id: str
    folder: Path
    created: str
    reason: str
    files: list[RemovedFile]
    extra: dict = field(default_factory=dict)
    restored: bool = False

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "folder": str(self.folder),
            "created": self.created,
            "reason": self.reason,
            "restored": self.restored,
            "files": [vars(f) for f in self.files],
            "extra": self.extra,
        }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checked_source(project: Project, path: Path, allowed_bases: tuple) -> Path:
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"{path} is a symbolic link; LoRA Kit only moves regular files")
    resolved = project.inside(path, *allowed_bases)
    if not resolved.is_file():
        raise UserError(f"{path} is not a file (already moved or deleted?); nothing was moved")
    removed = project.removed.resolve()
    if removed in resolved.parents:
        raise UserError(f"{path} is already in {removed}; use undo to bring it back")
    return resolved


def _record_path(project: Project, resolved: Path) -> str:
    base = project.path.resolve()
    if base in resolved.parents:
        return resolved.relative_to(base).as_posix()
    return str(resolved)


def _original(project: Project, record: str, allowed_bases: tuple) -> Path:
    """Where a manifest entry goes back to, confined like the move that took it away."""
    path = Path(record)
    if not path.is_absolute():
        return confine(project.path / path, project.path)
    try:
        return confine(path, *allowed_bases)
    except UserError:
        raise UserError(
            f"this batch restores {path}, outside the project; allow its folder "
            f"(CLI: undo --allow {path.parent}) and try again"
        ) from None


def _new_batch_folder(project: Project) -> tuple[datetime, Path]:
    project.removed.mkdir(parents=True, exist_ok=True)
    removed = project.inside(project.removed)
    while True:
        now = datetime.now(timezone.utc)
        folder = removed / now.strftime(_ID_FORMAT)
        if folder.with_name(folder.name + RESTORED_SUFFIX).exists():
            continue
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return now, folder


def move_to_removed(
    project: Project,
    paths,
    reason: str,
    extra: dict | None = None,
    allowed_bases=(),
) -> RemovalBatch:
    """Moves exactly ``paths`` (callers add sidecars themselves) into a new batch.

    Every path is checked before anything moves; paths outside the project must lie inside one
    of ``allowed_bases`` (e.g. A1111's Lora folder) and are recorded as absolute paths.
    """
    allowed_bases = tuple(Path(b) for b in allowed_bases)
    sources = list(dict.fromkeys(_checked_source(project, path, allowed_bases) for path in paths))
    if not sources:
        raise UserError("nothing to remove")
    # Read every file before the batch folder exists: an unreadable one stops here, leaving nothing behind.
    digests = [(sha256_file(src), src.stat().st_size) for src in sources]
    now, folder = _new_batch_folder(project)
    taken = {MANIFEST}
    entries = []
    for src, (digest, size) in zip(sources, digests):
        stored = free_name(folder, src.name, taken).name
        taken.add(stored)
        entries.append(RemovedFile(_record_path(project, src), stored, digest, size, reason))
    created = now.isoformat().replace("+00:00", "Z")
    batch = RemovalBatch(folder.name, folder, created, reason, entries, dict(extra or {}))
    _write_manifest(batch)
    moved: list[tuple[Path, Path]] = []
    try:
        for src, entry in zip(sources, entries):
            move_no_clobber(src, folder / entry.stored_name)
            moved.append((src, folder / entry.stored_name))
    except BaseException:
        for src, dst in reversed(moved):
            move_no_clobber(dst, src)
        # Every file is back where it was, so the batch describes nothing: it is ours to drop.
        (folder / MANIFEST).unlink()
        folder.rmdir()
        raise
    return batch


def _write_manifest(batch: RemovalBatch) -> None:
    data = batch.to_dict()
    del data["folder"], data["restored"]
    atomic_write_json(batch.folder / MANIFEST, {"version": 1, **data})


def _load(folder: Path) -> RemovalBatch:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = [RemovedFile(**entry) for entry in data["files"]]
        return RemovalBatch(
            id=data["id"],
            folder=folder,
            created=data["created"],
            reason=data["reason"],
            files=files,
            extra=data.get("extra", {}),
            restored=folder.name.endswith(RESTORED_SUFFIX),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{folder / MANIFEST} is missing or damaged ({exc}); its files are still in {folder}") from None


def list_batches(project: Project) -> list[RemovalBatch]:
    """Every batch with a manifest, oldest first (ids are UTC timestamps, so they sort by time)."""
    if not project.removed.is_dir():
        return []
    removed = project.inside(project.removed)
    folders = [p for p in removed.iterdir() if p.is_dir() and (p / MANIFEST).is_file()]
    return sorted((_load(p) for p in folders), key=lambda b: b.id)


def _find(project: Project, batch_id: str | None) -> RemovalBatch:
    batches = list_batches(project)
    if batch_id is None:
        pending = [b for b in batches if not b.restored]
        if not pending:
            raise UserError(f"nothing to undo in {project.removed}")
        return pending[-1]
    for batch in batches:
        if batch.id == batch_id.removesuffix(RESTORED_SUFFIX):
            if batch.restored:
                raise UserError(f"batch {batch.id} was already restored; nothing was moved")
            return batch
    raise UserError(f"no batch {batch_id!r} in {project.removed} (list them with: undo {project.name} --list)")


def _restore_moves(project: Project, batch: RemovalBatch, allowed_bases: tuple) -> list[tuple[Path, Path]]:
    """The moves that put ``batch`` back, or :class:`UserError` if any one of them cannot happen."""
    moves, problems = [], []
    for entry in batch.files:
        original = _original(project, entry.original_path, allowed_bases)
        stored = batch.folder / entry.stored_name
        if stored.is_file():
            if original.exists() or original.is_symlink():
                problems.append(f"{original} exists now (move it away first)")
            elif sha256_file(stored) != entry.sha256:
                problems.append(f"{stored} changed since it was removed")
            else:
                moves.append((stored, original))
        elif not (original.is_file() and sha256_file(original) == entry.sha256):
            # Present at the original place with the recorded bytes means it never left (a batch
            # interrupted half way) or was already put back; anything else is a file we lost track of.
            problems.append(f"{entry.stored_name} is missing from {batch.folder}")
    if problems:
        raise UserError(f"cannot undo batch {batch.id}, nothing was moved: " + "; ".join(problems))
    return moves


@holding_lock("undo")
def undo(project: Project, batch_id: str | None = None, allowed_bases=()) -> RemovalBatch:
    """Restores the newest unrestored batch (or ``batch_id``) exactly, or moves nothing at all.
    Takes the project's lock (:class:`~lorakit_ext.project_lock.ProjectBusy` while another
    operation holds it)."""
    batch = _find(project, batch_id)
    for stored, original in _restore_moves(project, batch, tuple(Path(b) for b in allowed_bases)):
        move_no_clobber(stored, original)
    done = batch.folder.with_name(batch.id + RESTORED_SUFFIX)
    batch.folder.rename(done)
    batch.folder, batch.restored = done, True
    return batch
