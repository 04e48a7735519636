"""A project on disk: ``<root>/<name>/`` with ``dataset/``, ``_removed/`` and ``runs/`` (and ``reg/``
once regularisation images are drawn).

Every path the library touches goes through :func:`confine`, so no project name, file name or
symlink can make it read or write outside the project (or another folder the caller allows).
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from lorakit_ext.errors import UserError

MAX_NAME = 64
# Windows refuses these as file names whatever the extension; a dataset must survive a copy there.
_RESERVED = {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(1, 10)} | {f"lpt{i}" for i in range(1, 10)}
_ALLOWED_PUNCT = "-_."


def validate_name(name: str, what: str = "project name") -> str:
    """Returns the NFC form of ``name`` or raises :class:`UserError` saying what is wrong."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{what} is empty")
    name = unicodedata.normalize("NFC", name)
    if name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise UserError(f"{what} {name!r} contains a path separator or is '.'/'..'; use a plain name")
    if len(name) > MAX_NAME:
        raise UserError(f"{what} {name!r} is {len(name)} characters long; the limit is {MAX_NAME}")
    if name.startswith("."):
        raise UserError(f"{what} {name!r} starts with '.', which would hide it")
    for ch in name:
        cat = unicodedata.category(ch)
        if not (cat[0] in "LM" or cat == "Nd" or ch in _ALLOWED_PUNCT):
            raise UserError(
                f"{what} {name!r} contains {ch!r}; use letters, digits, '-', '_' and '.' only"
            )
    if name.split(".")[0].lower() in _RESERVED:
        raise UserError(f"{what} {name!r} is a reserved device name on Windows")
    return name


def _within(path: Path, base: Path) -> bool:
    return path == base or base in path.parents


def _link_out_of(path: Path, base: Path) -> Path | None:
    """The first symlink among ``path``'s components below ``base`` whose target lies outside
    ``base``, or None. Only a path written under ``base`` (as given or resolved) has such components."""
    real_base = base.resolve()
    # abspath folds "..", which can only hide a link whose target the resolved path is checked against.
    written = Path(os.path.abspath(path))
    for start in dict.fromkeys((Path(os.path.abspath(base)), real_base)):
        if not _within(written, start):
            continue
        current = start
        for part in written.relative_to(start).parts:
            current = current / part
            if current.is_symlink() and not _within(current.resolve(), real_base):
                return current
    return None


def confine(path: Path | str, *bases: Path) -> Path:
    """Resolves ``path`` (following symlinks) and checks it lies inside one of ``bases``, and that
    no symlink on its way below a base leads out of that base.

    The resolved path alone would pass a link from one base into another allowed one (a dataset
    file linked into the Lora folder), or out of the base and back in.
    """
    resolved = Path(path).resolve()
    for base in bases:
        link = _link_out_of(Path(path), Path(base))
        if link is not None:
            raise UserError(
                f"{path} goes through the symbolic link {link}, which points to {link.resolve()}, outside {base}; "
                "refusing to follow it"
            )
    if any(_within(resolved, Path(base).resolve()) for base in bases):
        return resolved
    allowed = ", ".join(str(b) for b in bases)
    raise UserError(f"{path} resolves to {resolved}, outside {allowed}; refusing to touch it")


@dataclass(frozen=True)
class Project:
    root: Path
    name: str

    @property
    def path(self) -> Path:
        return self.root / self.name

    @property
    def dataset(self) -> Path:
        return self.path / "dataset"

    @property
    def removed(self) -> Path:
        return self.path / "_removed"

    @property
    def runs(self) -> Path:
        return self.path / "runs"

    @property
    def reg(self) -> Path:
        """The regularisation images LoRA Kit draws; ``reg_folders`` names it as ``1 reg``."""
        return self.path / "reg"

    def inside(self, path: Path | str, *extra_bases: Path) -> Path:
        # The project folder is the base below, so a symlink in its place would be followed
        # unchecked: it must stay inside the root first.
        confine(self.path, self.root)
        return confine(path, self.path, *extra_bases)

    def dataset_file(self, filename: str) -> Path:
        """A file directly in ``dataset/``, by name, confined to the project."""
        if Path(filename).name != filename or filename in ("", ".", ".."):
            raise UserError(f"{filename!r} is not a plain file name; give the name of a file inside dataset/")
        return self.inside(self.dataset / filename)


def _root(root: Path | str) -> Path:
    return Path(root).expanduser().resolve()


def create_project(root: Path | str, name: str) -> Project:
    project = Project(_root(root), validate_name(name))
    for sub in (project.dataset, project.removed, project.runs):
        # Checked before mkdir, which would otherwise create folders through a symlink's target.
        project.inside(sub)
        sub.mkdir(parents=True, exist_ok=True)
    return project


def open_project(root: Path | str, name: str) -> Project:
    project = Project(_root(root), validate_name(name))
    if not project.dataset.is_dir():
        raise UserError(f"no project {name!r} under {project.root} (create it with: project create {name})")
    project.inside(project.dataset)
    return project


def list_projects(root: Path | str) -> list[str]:
    root = _root(root)
    if not root.is_dir():
        return []
    names = []
    for entry in sorted(os.listdir(root)):
        try:
            project = Project(root, validate_name(entry))
            if project.dataset.is_dir():
                project.inside(project.dataset)
                names.append(entry)
        except UserError:
            continue
    return names
