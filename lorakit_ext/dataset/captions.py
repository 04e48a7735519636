"""Caption sidecars: ``a.png`` ↔ ``a.txt``, one line of UTF-8, as kohya sd-scripts reads them.

Reading is lenient so no user caption is lost or mangled: a UTF-8 BOM is dropped, CRLF/CR line
ends are accepted, and files in other encodings (UTF-16 from Notepad, Windows-1252) are decoded
with a warning naming the file. kohya trains on the first line only and would keep a BOM inside
the first tag, so a caption spread over several lines is read as one caption, its lines joined
with ", " (with a warning), and writing always produces one line of UTF-8 without a BOM.

A lone ``a.caption`` (kohya's other extension) is read when no ``a.txt`` exists; writes always go
to ``a.txt`` and leave the ``.caption`` file in place.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path

from lorakit_ext.dataset.files import CAPTION_EXTENSIONS, list_images
from lorakit_ext.fsutil import atomic_write_text
from lorakit_ext.project import Project

CAPTION_SUFFIX = ".txt"
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


@dataclass(frozen=True)
class CaptionRead:
    text: str
    warning: str | None = None
    source: Path | None = None


def caption_path(image: Path) -> Path:
    """Where ``image``'s caption is written."""
    return Path(image).with_suffix(CAPTION_SUFFIX)


def caption_source(image: Path) -> Path | None:
    """The file ``image``'s caption is read from: ``.txt``, else ``.caption``, else None."""
    for ext in CAPTION_EXTENSIONS:
        candidate = Path(image).with_suffix(ext)
        if candidate.is_file():
            return candidate
    return None


def decode_caption(data: bytes, name: str) -> tuple[str, str | None]:
    """Text of a caption file and a warning when it was not UTF-8."""
    if data.startswith(_UTF16_BOMS):
        return data.decode("utf-16", errors="replace"), f"{name} is UTF-16; read it as such (saving it writes UTF-8)"
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        pass
    try:
        text, label = data.decode("cp1252"), "Windows-1252"
    except UnicodeDecodeError:
        # cp1252 leaves five bytes undefined; latin-1 decodes any byte string.
        text, label = data.decode("latin-1"), "Latin-1"
    return text, f"{name} is not UTF-8; read it as {label}: check its text (saving it writes UTF-8)"


def caption_lines(text: str) -> list[str]:
    """Non-empty stripped lines, with any line ending and a leading BOM accepted."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return [line.strip() for line in text.split("\n") if line.strip()]


def normalize_caption(text: str) -> str:
    """The one-line form a caption is stored in."""
    return ", ".join(caption_lines(text))


def read_caption(image: Path, *, project: Project | None = None) -> CaptionRead:
    """``image``'s caption; "" when it has none. With ``project``, the caption file must lie inside
    it (a symlink pointing elsewhere is refused)."""
    source = caption_source(image)
    if source is None:
        return CaptionRead("")
    if project is not None:
        project.inside(source)
    text, warning = decode_caption(source.read_bytes(), source.name)
    lines = caption_lines(text)
    if len(lines) > 1:
        joined = (
            f"{source.name} has {len(lines)} lines; read as one caption joined with ', ' "
            "(kohya would train on the first line only; saving it writes one line)"
        )
        warning = f"{warning}; {joined}" if warning else joined
    return CaptionRead(", ".join(lines), warning, source)


def write_caption(image: Path, text: str, *, project: Project | None = None) -> Path:
    """Writes ``text`` as ``image``'s one-line UTF-8 caption, atomically; returns the file."""
    target = caption_path(image)
    if project is not None:
        project.inside(target)
    atomic_write_text(target, normalize_caption(text))
    return target


def read_captions(project: Project) -> dict[str, CaptionRead]:
    """Every dataset image's caption by image file name, in name order."""
    return {image.name: read_caption(image, project=project) for image in list_images(project.dataset)}


def load_captions(project: Project) -> dict[str, str]:
    return {name: read.text for name, read in read_captions(project).items()}
