"""Which files in a dataset folder are images, and which files travel with an image."""

from __future__ import annotations

import os
from pathlib import Path

from lorakit_ext.project import confine

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# kohya reads `.txt` by default and `.caption` when told to; both belong to their image.
CAPTION_EXTENSIONS = (".txt", ".caption")


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def find_images(folder: Path, recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """Image files in ``folder`` (and its sub-folders when ``recursive``) by name, sorted, and the
    sub-folders that are symbolic links, which are never followed: one can point anywhere, even at
    its own parent."""
    if not folder.is_dir():
        return [], []
    if not recursive:
        return sorted(p for p in folder.iterdir() if p.is_file() and is_image_name(p)), []
    images, links = [], []
    for here, folders, files in os.walk(folder):
        here = Path(here)
        links += [here / name for name in folders if (here / name).is_symlink()]
        images += [here / name for name in files if is_image_name(here / name) and (here / name).is_file()]
    return sorted(images), sorted(links)


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` by name, sorted; hidden files and sub-folders' files skipped
    unless ``recursive``."""
    return find_images(folder, recursive)[0]


def dataset_images(dataset: Path) -> list[Path]:
    """The images of a project's ``dataset/`` by name, refusing (``UserError``) one that is a
    symbolic link leading out of it: training and captioning read every byte of them."""
    images = list_images(dataset)
    for image in images:
        confine(image, dataset)
    return images


def sidecars(image: Path) -> list[Path]:
    """Existing same-stem caption files of ``image`` (``a.png`` → ``a.txt``, ``a.caption``)."""
    return [image.with_suffix(ext) for ext in CAPTION_EXTENSIONS if image.with_suffix(ext).is_file()]
