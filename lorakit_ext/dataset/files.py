"""Which files in a dataset folder are images, and which files travel with an image."""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# kohya reads `.txt` by default and `.caption` when told to; both belong to their image.
CAPTION_EXTENSIONS = (".txt", ".caption")


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` by name, sorted; hidden files and sub-folders' files skipped
    unless ``recursive``."""
    if not folder.is_dir():
        return []
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in pattern if p.is_file() and is_image_name(p))


def sidecars(image: Path) -> list[Path]:
    """Existing same-stem caption files of ``image`` (``a.png`` → ``a.txt``, ``a.caption``)."""
    return [image.with_suffix(ext) for ext in CAPTION_EXTENSIONS if image.with_suffix(ext).is_file()]
