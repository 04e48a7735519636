"""One writer per project: a lock file ``<project>/.lorakit.lock`` naming its holder.

Training, dedupe apply, undo, caption runs, drawing regularisation images and promote take it,
whichever front door (CLI, tab, API) asks, so two of them can never interleave their writes. The
file is created with ``O_EXCL`` (atomic on local and NFSv3+ file systems) and holds the holder's
pid, host, start time and purpose, so a refusal can say who holds it. A lock whose holder process
is gone (same host, dead pid) is stale and taken over; a lock from another host is never broken
automatically.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from lorakit_ext.errors import UserError
from lorakit_ext.fsutil import pid_alive

LOCK_FILE = ".lorakit.lock"
# A lock file no one could read yet may belong to a holder between creating and writing it.
_UNWRITTEN_GRACE_S = 10.0
# Tokens of the locks this process holds now: a lock file naming this pid but none of these is
# left over from an operation of ours that died without releasing it.
_held: set[str] = set()
_held_guard = threading.Lock()


class ProjectBusy(UserError):
    """Another operation holds the project's lock."""


def read_holder_file(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_holder(project_path: Path) -> dict | None:
    """The lock's holder record, or None when the project is free (or the file is unreadable)."""
    return read_holder_file(Path(project_path) / LOCK_FILE)


def describe_holder(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started_at", 0)))
    return f"{holder.get('purpose', 'an operation')} (pid {holder.get('pid')} on {holder.get('host')}, since {since})"


def _is_stale(holder: dict | None, lock_path: Path) -> bool:
    if holder is None:
        # Unreadable: a holder between creating and writing the file (give it a moment), one that
        # died there, or garbage.
        try:
            return time.time() - lock_path.stat().st_mtime > _UNWRITTEN_GRACE_S
        except FileNotFoundError:
            return True
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return True
    if pid == os.getpid():
        # This process: stale only if no live lock object of ours holds it (a crashed thread).
        return holder.get("token") not in _held
    return not pid_alive(pid)


class ProjectLock:
    """``with ProjectLock(project.path, "training"):`` — raises :class:`ProjectBusy` when held.

    Not re-entrant: an operation takes it once, at its outermost level. ``acquire()`` and
    ``release()`` may run on different threads (the HTTP API takes it when a job is queued and the
    job's thread releases it when the job ends).
    """

    def __init__(self, project_path: Path | str, purpose: str):
        self.path = Path(project_path) / LOCK_FILE
        self.purpose = purpose
        self.token: str | None = None

    def acquire(self) -> "ProjectLock":
        token = uuid.uuid4().hex
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
                  "purpose": self.purpose, "token": token}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = read_holder(self.path.parent)
                if not _is_stale(holder, self.path):
                    raise ProjectBusy(
                        f"project {self.path.parent.name!r} is busy: {describe_holder(holder)}; wait for it to "
                        f"finish or stop it, then try again (if that process no longer runs, delete {self.path})"
                    ) from None
                self._break_stale(holder)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(record, fh)
                fh.flush()
                os.fsync(fh.fileno())
            with _held_guard:
                _held.add(token)
            self.token = token
            return self
        raise ProjectBusy(f"could not take the lock {self.path}: another process keeps taking it; try again")

    def _break_stale(self, holder: dict | None) -> None:
        # Renaming first makes breaking atomic: of two processes breaking the same stale lock, one
        # rename succeeds and the other finds the file gone (and retries creating it).
        aside = self.path.with_name(f"{LOCK_FILE}.stale.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = read_holder_file(aside)
        if moved != holder and not _is_stale(moved, aside):
            # A live holder took the lock between our read and the rename: give it back (a link,
            # so a lock a third process created meanwhile is not replaced).
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            finally:
                aside.unlink(missing_ok=True)
            raise ProjectBusy(f"project {self.path.parent.name!r} is busy: {describe_holder(moved)}")
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        if self.token is None:
            return
        if (read_holder(self.path.parent) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
        with _held_guard:
            _held.discard(self.token)
        self.token = None

    def __enter__(self) -> "ProjectLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()



def holding_lock(purpose: str):
    """Decorates an operation whose first argument is a Project: it runs with the project's lock."""

    def decorate(operation):
        @functools.wraps(operation)
        def locked(project, *args, **kwargs):
            with ProjectLock(project.path, purpose):
                return operation(project, *args, **kwargs)

        return locked

    return decorate
