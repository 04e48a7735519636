"""Importing images into a project's ``dataset/`` from a server folder or a list of files.

Two steps: collecting candidates raises :class:`UserError` for a request that makes no sense
(missing or empty folder, the dataset itself as source) before anything is written; importing
then validates each file, rejects bad ones with a reason and copies the rest. Sources are only
ever read, and nothing in ``dataset/`` is replaced: a name in use gets a ``_N`` suffix. A file whose
content the dataset already holds is skipped and reported with the name it has there, so importing
a folder again adds only what is new.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from lorakit_ext.dataset.files import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, find_images, is_image_name, sidecars
from lorakit_ext.dataset.images import DEFAULT_MAX_PIXELS, dataset_payload, inspect_image
from lorakit_ext.errors import UserError
from lorakit_ext.fsutil import atomic_write_bytes
from lorakit_ext.project import Project, confine

UPLOAD_GROUP = "upload"
MAX_STEM = 150  # leaves room for a "_N" suffix and an extension within 255 bytes of most names
# Path separators, control characters (and lone surrogates from undecodable names) and what
# Windows refuses in names, so a dataset survives being copied there.
_UNSAFE = re.compile(r'[\\/\x00-\x1f\x7f-\x9f<>:"|?*\ud800-\udfff]')
_BIDI_CONTROLS = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}


@dataclass
class Candidate:
    """One file to import. Files of one ``group`` (a folder, or one upload) that share a stem and a
    caption file cannot both keep it, so only the first of them is imported. ``skip`` marks what is
    passed over without being wrong, such as a symlinked sub-folder."""

    source: Path
    name: str
    group: str
    label: str
    captions: dict[str, Path] = field(default_factory=dict)  # extension → caption file
    reason: str | None = None
    skip: str | None = None


@dataclass
class ImportedFile:
    source: str
    dest: Path
    converted_reason: str | None = None
    renamed_from: str | None = None
    captions: list[Path] = field(default_factory=list)


@dataclass
class Rejected:
    source: str
    reason: str


@dataclass
class Skipped:
    """Not imported, and nothing wrong with it: the dataset already holds the same bytes as
    ``duplicate_of``, or it is a folder that was not entered."""

    source: str
    reason: str
    duplicate_of: str | None = None


@dataclass
class ImportReport:
    imported: list[ImportedFile] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "imported": [
                {
                    "source": f.source,
                    "dest": str(f.dest),
                    "converted_reason": f.converted_reason,
                    "renamed_from": f.renamed_from,
                    "captions": [str(c) for c in f.captions],
                }
                for f in self.imported
            ],
            "rejected": [{"source": r.source, "reason": r.reason} for r in self.rejected],
            "skipped": [{"source": k.source, "reason": k.reason, "duplicate_of": k.duplicate_of} for k in self.skipped],
        }


def sanitize_filename(name: str) -> str:
    """A plain file name from a name a browser sent: directories dropped, separators and control
    characters replaced, leading/trailing dots and spaces removed, unicode kept."""
    name = unicodedata.normalize("NFC", str(name))
    base = re.split(r"[\\/]", name)[-1]
    base = "".join("_" if ch in _BIDI_CONTROLS else ch for ch in _UNSAFE.sub("_", base))
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    stem = stem.strip(" .")[:MAX_STEM].strip(" .") or "image"
    ext = ext.strip(" .")
    return f"{stem}.{ext}" if ext else stem


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def _ext(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _dataset_overlap(project: Project, root: Path, recursive: bool) -> str | None:
    dataset, project_dir = project.dataset.resolve(), project.path.resolve()
    if root == dataset or dataset in root.parents:
        return "is this project's dataset folder; import from the folder where your images are"
    if recursive and (root == project_dir or root in project_dir.parents):
        return "contains this project's folder; a recursive import would copy the project into itself"
    return None


def _no_images_message(folder: Path, recursive: bool, links: list[Path]) -> str:
    if not any(folder.iterdir()):
        return f"{folder} is empty; put the images there or choose another folder"
    kinds = ", ".join(IMAGE_EXTENSIONS)
    has_subfolders = any(p.is_dir() for p in folder.iterdir())
    hint = "; import recursively to include sub-folders" if has_subfolders and not recursive else ""
    if links:
        hint = "; " + "; ".join(f"{link}: {_link_reason(link)}" for link in links)
    return f"no images ({kinds}) found in {folder}{hint}"


def _link_reason(link: Path) -> str:
    return (
        f"a symbolic link to the folder {link.resolve()}, not followed (a link can lead anywhere, even "
        "back up the tree); import that folder by its own path to include its images"
    )


def _hidden(path: Path, folder: Path) -> bool:
    # Hidden sub-folders (.git, .thumbnails, .ipynb_checkpoints) hold copies nobody wants trained.
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def _outside_reason(path: Path, root: Path, what: str) -> str | None:
    try:
        confine(path, root)
    except UserError:
        target = path.resolve()
        return f"{what} is a symlink pointing outside the source folder (to {target}); not followed"
    return None


def collect_folder(project: Project, folder: Path | str, recursive: bool = False) -> list[Candidate]:
    """Every image in ``folder`` (and its sub-folders when ``recursive``) with its captions."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"source folder {folder} does not exist or is not a folder")
    root = folder.resolve()
    overlap = _dataset_overlap(project, root, recursive)
    if overlap:
        raise UserError(f"{folder} {overlap}")
    images, links = find_images(folder, recursive)
    paths = [p for p in images if not _hidden(p, folder)]
    links = [p for p in links if not _hidden(p, folder)]
    if not paths:
        raise UserError(_no_images_message(folder, recursive, links))
    candidates = [
        Candidate(link, link.name, str(link.parent.relative_to(folder)), str(link), skip=_link_reason(link))
        for link in links
    ]
    for path in paths:
        captions = {p.suffix.lower(): p for p in sidecars(path)}
        reason = _outside_reason(path, root, "the image")
        for caption in captions.values():
            reason = reason or _outside_reason(caption, root, f"its caption {caption.name}")
        group = str(path.parent.relative_to(folder))
        candidates.append(Candidate(path, path.name, group, str(path), captions, reason))
    return candidates


def _file_reason(path: Path, name: str, dataset: Path) -> str | None:
    ext = _ext(name)
    if ext not in IMAGE_EXTENSIONS:
        return f"not an image file type ({ext or 'no extension'}); use {', '.join(IMAGE_EXTENSIONS)}"
    if not path.is_file():
        return "file not found"
    if path.resolve().parent == dataset:
        return "already in this project's dataset"
    return None


def _listed(path: Path, original_name: str | None) -> Candidate:
    if original_name is None:
        return Candidate(path, path.name, str(path.resolve().parent), str(path))
    return Candidate(path, sanitize_filename(original_name), UPLOAD_GROUP, str(original_name))


def collect_files(
    project: Project, paths: Iterable[Path | str], original_names: Sequence[str] | None = None
) -> list[Candidate]:
    """Candidates for explicit files: paths named on the command line, or uploads whose temp
    ``paths`` carry random names while ``original_names`` holds the names the user chose.

    Caption files in the list go with the image of the same stem; captions lying next to a file
    on disk come along too."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no files to import; choose at least one image")
    if original_names is not None and len(original_names) != len(paths):
        raise ValueError(f"{len(paths)} paths but {len(original_names)} original names")
    names = original_names if original_names is not None else [None] * len(paths)
    listed = [_listed(path, name) for path, name in zip(paths, names)]
    captions = [c for c in listed if _ext(c.name) in CAPTION_EXTENSIONS]
    images = [c for c in listed if _ext(c.name) not in CAPTION_EXTENSIONS]
    dataset = project.dataset.resolve()
    by_stem: dict[tuple[str, str], dict[str, Path]] = {}
    for caption in captions:
        if caption.source.is_file():
            key = (caption.group, _stem(caption.name))
            by_stem.setdefault(key, {})[_ext(caption.name)] = caption.source
        else:
            caption.reason = "file not found"
    for image in images:
        image.reason = _file_reason(image.source, image.name, dataset)
        if image.reason is None:
            image.captions = {p.suffix.lower(): p for p in sidecars(image.source)}
            image.captions.update(by_stem.get((image.group, _stem(image.name)), {}))
    paired = {(c.group, _stem(c.name)) for c in images if c.reason is None}
    for caption in captions:
        if caption.reason is None and (caption.group, _stem(caption.name)) not in paired:
            caption.reason = "caption file with no image of the same name in this import"
    return images + [c for c in captions if c.reason is not None]


def _free_stem(stem: str, taken: set[str]) -> str:
    # One stem names an image and its captions, so it must be free across every extension.
    candidate, n = stem, 0
    while candidate.lower() in taken:
        n += 1
        candidate = f"{stem}_{n}"
    return candidate


def _write(path: Path, data: bytes, done: int) -> None:
    try:
        # The name was free when chosen; never replace a file another writer put there since.
        atomic_write_bytes(path, data, replace=False)
    except FileExistsError:
        raise UserError(f"{path} appeared while importing (another program writes there); {done} files were "
                        "imported before this, import again to add the rest") from None
    except OSError as exc:
        raise UserError(
            f"could not write {path} ({exc.strerror or exc}); {done} files were imported before this"
        ) from exc


class _Contents:
    """Which image in ``dataset/`` already holds some bytes. Files are grouped by size and only those
    of the size asked about are read (once), so a large dataset costs a directory listing."""

    def __init__(self, dataset: Path):
        self._by_size: dict[int, list[Path]] = {}
        self._digests: dict[Path, bytes] = {}
        for path in dataset.iterdir():
            # A link may lead out of the project; it is never read here.
            if is_image_name(path) and not path.is_symlink() and path.is_file():
                self._by_size.setdefault(path.stat().st_size, []).append(path)

    def holding(self, data: bytes) -> Path | None:
        digest = None
        for path in self._by_size.get(len(data), []):
            if path not in self._digests:
                try:
                    self._digests[path] = hashlib.sha256(path.read_bytes()).digest()
                except OSError:
                    continue
            digest = digest or hashlib.sha256(data).digest()
            if self._digests[path] == digest:
                return path
        return None

    def add(self, path: Path, data: bytes) -> None:
        self._by_size.setdefault(len(data), []).append(path)
        self._digests[path] = hashlib.sha256(data).digest()


def _already_there(candidate: Candidate, existing: Path, captions: list[tuple[str, bytes]]) -> Skipped:
    reason = f"already in the dataset as {existing.name} (same content)"
    for caption_ext, text in captions:
        theirs = existing.with_suffix(caption_ext)
        if not theirs.is_file():
            reason += f"; its caption {candidate.captions[caption_ext].name} was not copied ({existing.name} has none there)"
        elif theirs.read_bytes() != text:
            reason += f"; its caption {candidate.captions[caption_ext].name} differs from {theirs.name} there and was not copied"
    return Skipped(candidate.label, reason, existing.name)


def _import_one(project: Project, candidate: Candidate, max_pixels: int, taken: set[str], contents: _Contents, done: int):
    check = inspect_image(candidate.source, max_pixels)
    if not check.ok:
        return Rejected(candidate.label, check.reason)
    captions = []
    for caption_ext, caption in candidate.captions.items():
        try:
            captions.append((caption_ext, caption.read_bytes()))
        except OSError as exc:
            reason = f"cannot read its caption {caption.name} ({exc.strerror or exc})"
            return Rejected(candidate.label, reason)
    payload, ext = dataset_payload(check, candidate.name)
    existing = contents.holding(payload)
    if existing is not None:
        return _already_there(candidate, existing, captions)
    wanted = _stem(sanitize_filename(candidate.name))
    stem = _free_stem(wanted, taken)
    taken.add(stem.lower())
    dest = project.dataset_file(stem + ext)
    _write(dest, payload, done)
    contents.add(dest, payload)
    caption_dests = []
    for caption_ext, text in captions:
        caption_dest = project.dataset_file(stem + caption_ext)
        _write(caption_dest, text, done)
        caption_dests.append(caption_dest)
    renamed_from = candidate.name if stem != _stem(candidate.name) else None
    return ImportedFile(candidate.label, dest, check.conversion, renamed_from, caption_dests)


def _same_stem_reason(candidate: Candidate, first: str) -> str:
    where = "in this upload" if candidate.group == UPLOAD_GROUP else "in the same folder"
    return (
        f"same name as {first} {where}, so its caption file could belong to either; "
        "rename one of them and import it again"
    )


def import_candidates(
    project: Project, candidates: list[Candidate], max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImportReport:
    """Validates and copies each candidate in order; never raises for a bad file.

    Two images of one group with one stem (``x.jpg``, ``x.png``) both come in, under distinct stems,
    unless a caption file goes with that stem: then it could be either one's, and the second is
    rejected."""
    dataset = project.inside(project.dataset)
    taken = {_stem(p.name).lower() for p in dataset.iterdir()}
    contents = _Contents(dataset)
    first_of_stem: dict[tuple[str, str], tuple[str, bool]] = {}
    report = ImportReport()
    for candidate in candidates:
        key = (candidate.group, _stem(candidate.name))
        first, first_captioned = first_of_stem.get(key, (None, False))
        if candidate.skip is not None:
            report.skipped.append(Skipped(candidate.label, candidate.skip))
        elif candidate.reason is not None:
            report.rejected.append(Rejected(candidate.label, candidate.reason))
        elif first is not None and (first_captioned or candidate.captions):
            report.rejected.append(Rejected(candidate.label, _same_stem_reason(candidate, first)))
        else:
            outcome = _import_one(project, candidate, max_pixels, taken, contents, len(report.imported))
            if isinstance(outcome, Rejected):
                report.rejected.append(outcome)
                continue
            (report.imported if isinstance(outcome, ImportedFile) else report.skipped).append(outcome)
            first_of_stem.setdefault(key, (candidate.name, bool(candidate.captions)))
    return report


def import_folder(
    project: Project, folder: Path | str, recursive: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImportReport:
    return import_candidates(project, collect_folder(project, folder, recursive), max_pixels)


def import_files(
    project: Project,
    paths: Iterable[Path | str],
    original_names: Sequence[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImportReport:
    return import_candidates(project, collect_files(project, paths, original_names), max_pixels)
