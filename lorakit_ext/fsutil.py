"""File writes that never leave a half-written file, and moves that never overwrite."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: Path, data: bytes, *, replace: bool = True) -> None:
    """Writes ``data`` to ``path`` through a temp file, so readers see the old file or the new one.

    ``replace=False`` refuses (``FileExistsError``) when ``path`` exists, also when another writer
    creates it meanwhile: the file is published with a hard link, which never replaces.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The pid in the name lets a later start tell a dead writer's leftover from a live write.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        # mkstemp makes the file private (0600); A1111 or a web server running as another user
        # must still read LoRAs and cards, so keep the old file's mode or use the usual 0644.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _publish_new(Path(tmp), path)
    except BaseException:
        # The temp file is ours, not the user's: removing it loses nothing.
        Path(tmp).unlink(missing_ok=True)
        raise


def _publish_new(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"refusing to overwrite {path}") from None
    except OSError:
        # No hard links here (FAT, some network shares): check, then rename (a narrow race).
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"refusing to overwrite {path}") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


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


def _writer_pid(temp_name: str) -> int | None:
    """The pid in ``.<name>.<pid>.<random>.tmp``, or None for a name atomic writes don't make."""
    if not (temp_name.startswith(".") and temp_name.endswith(TEMP_SUFFIX)):
        return None
    parts = temp_name[: -len(TEMP_SUFFIX)].rsplit(".", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def stale_temp_files(folder: Path, final_names=None) -> list[Path]:
    """Temp files in ``folder`` (not below it) left by atomic writes of a process that is gone.

    ``final_names``: a predicate on the final file name, so a shared folder (A1111's Lora folder)
    only yields the leftovers of our own files. Only files whose writer pid no longer runs count.
    """
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        pid = _writer_pid(entry.name)
        if pid is None or not entry.is_file(follow_symlinks=False) or pid_alive(pid):
            continue
        final = entry.name[1:].rsplit(".", 3)[0]
        if final_names is None or final_names(final):
            found.append(Path(entry.path))
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (one of another user's counts)."""
    if os.name == "nt":
        # On Windows os.kill(pid, 0) is no probe: it terminates the process.
        return windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


_QUERY_LIMITED_INFORMATION, _ACCESS_DENIED, _STILL_ACTIVE = 0x1000, 5, 259


def windows_pid_alive(pid: int, kernel32=None, last_error=None) -> bool:
    """``pid_alive`` through the Win32 API (``kernel32``/``last_error``: stand-ins for tests)."""
    import ctypes

    if kernel32 is None:
        kernel32, last_error = ctypes.WinDLL("kernel32", use_last_error=True), ctypes.get_last_error
    handle = kernel32.OpenProcess(_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return last_error() == _ACCESS_DENIED  # exists, another user's
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == _STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)
