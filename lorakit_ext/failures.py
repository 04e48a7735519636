"""What a failure means to the user: the one place that turns the errors a user can meet (disk
full, file too large, permissions, out of memory, numbers out of range) into a
:class:`~lorakit_ext.errors.UserError` with a remedy. The CLI, the API and the tab all show
these instead of tracebacks; anything else is a bug, reported as one."""

from __future__ import annotations

import errno

from lorakit_ext.errors import UserError

_DISK = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file grew past the largest size allowed here (the file system's or the process's 'ulimit -f')",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
    errno.EIO: "the disk reported an input/output error",
}
_REMEDY = {
    errno.ENOSPC: "free some space (or choose another folder) and try again",
    errno.EDQUOT: "free some space (or choose another folder) and try again",
    errno.EFBIG: "raise the limit or choose a folder on another file system, then try again",
    errno.EROFS: "choose a writable folder",
    errno.EACCES: "fix the folder's permissions or choose another one",
    errno.EPERM: "fix the folder's permissions or choose another one",
    errno.EIO: "check the disk",
}


def as_user_error(exc: BaseException) -> UserError | None:
    """``exc`` as a user-facing error, or None when it is a bug (then show it as one)."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, OSError) and exc.errno in _DISK:
        where = f" ({exc.filename})" if exc.filename else ""
        return UserError(f"{_DISK[exc.errno]}{where}; {_REMEDY[exc.errno]}. Nothing written before was lost")
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return UserError(
            "out of memory: lower the batch size or resolution, or use the 'Low VRAM' preset (gradient "
            "checkpointing), then try again (an interrupted training run resumes from its last saved epoch)"
        )
    if isinstance(exc, OverflowError):
        return UserError(f"a number is too large ({exc}); use a value in the allowed range")
    return None
