"""File writes that never leave a half-written file, and moves that never overwrite."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); A1111 or a web server running as another user
        # must still read LoRAs and cards, so keep the old file's mode or use the usual 0644.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # The temp file is ours, not the user's: removing it loses nothing.
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def free_name(directory: Path, filename: str, taken: set[str] | None = None) -> Path:
    """``directory/filename``, or ``stem_1.ext``, ``stem_2.ext``… when that name is in use.

    Names are compared case-insensitively so a dataset copied to Windows or macOS keeps every file.
    """
    taken_lower = {t.lower() for t in (taken or ())}
    existing = {p.name.lower() for p in directory.iterdir()} if directory.exists() else set()
    stem, suffix = os.path.splitext(filename)
    candidate, n = filename, 0
    while candidate.lower() in existing or candidate.lower() in taken_lower:
        n += 1
        candidate = f"{stem}_{n}{suffix}"
    return directory / candidate


def move_no_clobber(src: Path, dst: Path) -> None:
    """Moves ``src`` to ``dst``; refuses to replace an existing ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(f"refusing to overwrite {dst}")
    try:
        os.link(src, dst)
    except FileExistsError:
        raise FileExistsError(f"refusing to overwrite {dst}") from None
    except OSError:
        # No hard links here (other file system, FAT, some network shares): copy instead.
        shutil.copy2(src, dst)
    os.unlink(src)
