"""Image folders trained beside a project's dataset, and regularisation folders, as kohya reads them.

A folder comes as one line of ``TrainConfig.dataset_folders`` or ``reg_folders``: ``<repeats>
<folder>``, a folder named kohya's way (``<repeats>_<name>``, the name's words being the caption
of an image that has none), or a folder of such folders (kohya's ``train_data_dir`` /
``reg_data_dir``). Relative paths are inside the project folder, so ``1 reg`` names its generated
regularisation images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lorakit_ext.errors import UserError

_COUNTED = re.compile(r"^(\d+)\s+(.+)$")
_KOHYA_NAME = re.compile(r"^(\d+)_(.*)$")


@dataclass(frozen=True)
class ImageFolder:
    path: Path
    repeats: int
    regularisation: bool = False
    # The caption of an image without one: the words of a kohya folder name ("1_woman" → "woman").
    class_tokens: str = ""

    @property
    def label(self) -> str:
        """kohya's name for it in ``ss_dataset_dirs``/``ss_reg_dataset_dirs``: ``<repeats>_<name>``."""
        match = _KOHYA_NAME.match(self.path.name)
        return f"{self.repeats}_{match.group(2) if match else self.path.name}"


def _kohya_folder(path: Path, regularisation: bool) -> ImageFolder | None:
    match = _KOHYA_NAME.match(path.name)
    if not match:
        return None
    return ImageFolder(path, int(match.group(1)), regularisation, match.group(2).replace("_", " ").strip())


def line_path(line: str, base: Path) -> tuple[int | None, Path]:
    """A folder line's leading repeats (None when it gives none) and its folder, a relative one
    inside ``base``; whether that folder exists is not looked at."""
    counted = _COUNTED.match(line)
    path = Path(counted.group(2).strip() if counted else line).expanduser()
    return (int(counted.group(1)) if counted else None), (path if path.is_absolute() else Path(base) / path)


def _folders_of_line(line: str, base: Path, regularisation: bool, what: str) -> list[ImageFolder]:
    repeats, path = line_path(line, base)
    if not path.is_dir():
        raise UserError(f"{what} {path} is not a folder; fix the line {line!r} or remove it")
    if repeats is not None:
        if repeats < 1:
            raise UserError(f"{what} line {line!r}: repeats must be at least 1")
        named = _kohya_folder(path, regularisation)
        return [ImageFolder(path, repeats, regularisation, named.class_tokens if named else "")]
    own = _kohya_folder(path, regularisation)
    if own is not None:
        return [own]
    children = sorted(child for child in path.iterdir() if child.is_dir() and not child.is_symlink())
    inner = [folder for folder in (_kohya_folder(child, regularisation) for child in children) if folder is not None]
    if not inner:
        raise UserError(
            f"{what} {path}: give its repeats ('5 {line}'), or name it kohya's way ('5_name'), "
            "or give a folder holding such '<repeats>_<name>' folders"
        )
    return inner


def parse_folders(text: str, base: Path, *, regularisation: bool = False) -> list[ImageFolder]:
    """The folders ``text`` names, one line each (blank lines and ``#`` comments skipped), in
    order; :class:`UserError` names a line that is not a folder or whose repeats are unknown, and a
    folder named twice."""
    what = "regularisation folder" if regularisation else "image folder"
    folders = [folder for raw in text.splitlines() if (line := raw.strip()) and not line.startswith("#")
               for folder in _folders_of_line(line, Path(base), regularisation, what)]
    seen: set[Path] = set()
    for folder in folders:
        resolved = folder.path.resolve()
        if resolved in seen:
            raise UserError(f"{what} {folder.path} is named twice; keep one line for it")
        seen.add(resolved)
    return folders


def balance_reg_repeats(train_image_steps: int, reg_repeats: list[int]) -> list[int]:
    """Each regularisation image's repeats once kohya has matched them to ``train_image_steps``
    (training images × their repeats): in order, images are taken with their own repeats until
    that count is reached (the rest, 0, are not used), and while it is not, every image in turn
    gains one more repeat. Empty or zero in, zeros out."""
    out = [0] * len(reg_repeats)
    if not reg_repeats or train_image_steps <= 0:
        return out
    n, first = 0, True
    while n < train_image_steps:
        for i, repeats in enumerate(reg_repeats):
            if first:
                out[i] = repeats
                n += repeats
            else:
                out[i] += 1
                n += 1
            if n >= train_image_steps:
                break
        first = False
    return out
