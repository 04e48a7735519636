"""A queue of training runs, kept as files under ``<projects root>/.queue/`` and run several at a
time, one per GPU (or several per GPU when they fit), each as its own ``python -m lorakit_ext
train`` process: its own project lock, run record, output and log.

An entry is a folder ``<queue>/<id>/`` (``mkdir`` claims the id atomically) holding ``entry.json``
(the train command's arguments and the entry's status), ``run.log`` (the run's progress) and
``result.json`` (what ``train --json`` printed). Adding needs no lock, so entries can be added while
the queue runs; one process at a time runs a queue (it holds the queue folder's lock).

The standard library's process tools are the engine: one host, a handful of GPUs. Past one host,
the user's own job scheduler (Slurm, a Kubernetes Job, …) starts ``python -m lorakit_ext train``
itself; nothing here needs to change for that.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from lorakit_ext.errors import UserError
from lorakit_ext.fsutil import atomic_write_json, pid_alive
from lorakit_ext.project_lock import ProjectLock

QUEUE_DIR = ".queue"
ENTRY_FILE = "entry.json"
# Created (O_EXCL) by whichever acts on a queued entry first, the runner starting it or a cancel:
# the other then leaves it alone. It names its claimant (pid, host), so that a claim whose
# claimant died before it marked the entry is taken back; an unreadable one only after a grace.
CLAIM_FILE = ".claimed"
_UNWRITTEN_CLAIM_GRACE_S = 30
# Exit codes of ``train``: 130 is a stop by Ctrl-C (resumable).
_STATUS = {0: "finished", 130: "interrupted"}


def queue_dir(root: Path) -> Path:
    return Path(root).resolve() / QUEUE_DIR


def _read(folder: Path) -> dict | None:
    try:
        return json.loads((folder / ENTRY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # being written by ``add``, or not ours


def add_entry(root: Path, project: str, argv: list[str], files: dict[str, str] | None = None, cwd: str | None = None) -> dict:
    """Queues ``python -m lorakit_ext <argv>`` for ``project``, to run in ``cwd`` (where relative
    paths in ``argv`` were meant; default: wherever the queue runs); ``files`` are written into the
    entry's folder first (``{name: text}``, e.g. the config file an API request brings), and
    ``{entry}`` in ``argv`` stands for that folder."""
    folder = queue_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        entry_dir = folder / (f"{stamp}-{project}" if n == 1 else f"{stamp}-{project}-{n}")
        try:
            entry_dir.mkdir()
        except FileExistsError:
            continue
        for name, text in (files or {}).items():
            (entry_dir / name).write_text(text, encoding="utf-8")
        entry = {"id": entry_dir.name, "project": project, "argv": [a.replace("{entry}", str(entry_dir)) for a in argv],
                 "cwd": cwd, "status": "queued", "added_at": time.time()}
        atomic_write_json(entry_dir / ENTRY_FILE, entry)
        return entry
    raise UserError(f"could not add to the queue in {folder}: too many entries added this second")


def list_entries(root: Path) -> list[dict]:
    """Every entry, oldest first."""
    folder = queue_dir(root)
    if not folder.is_dir():
        return []
    found = (_read(p) for p in sorted(folder.iterdir()) if p.is_dir())
    return [e for e in found if e is not None]


def _claim(folder: Path) -> bool:
    try:
        fd = os.open(folder / CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as claim:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, claim)
    return True


def _gone(pid, host) -> bool:
    """A process of this host that no longer runs (one of another host is never judged)."""
    return host == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid)


def _claim_is_stale(path: Path) -> bool:
    try:
        claimant = json.loads(path.read_text(encoding="utf-8"))
        return _gone(claimant.get("pid"), claimant.get("host"))
    except FileNotFoundError:
        return False
    except (OSError, ValueError, AttributeError):
        try:
            return time.time() - path.stat().st_mtime > _UNWRITTEN_CLAIM_GRACE_S
        except FileNotFoundError:
            return False


def _waiting(entry: dict, root: Path) -> bool:
    """Queued and claimed by no one (alive) yet; a dead claimant's claim is taken back here."""
    if entry["status"] != "queued":
        return False
    claim = queue_dir(root) / entry["id"] / CLAIM_FILE
    if _claim_is_stale(claim):
        claim.unlink(missing_ok=True)
    return not claim.exists()


def cancel_entry(root: Path, entry_id: str) -> dict:
    """Takes a queued entry out of the queue (its folder stays, marked ``cancelled``)."""
    path = queue_dir(root) / entry_id
    entry = _read(path) if path.parent == queue_dir(root) and path.is_dir() else None
    if entry is None:
        raise UserError(f"no queue entry {entry_id!r}; `queue list` shows them")
    if entry["status"] != "queued" or not _claim(path):
        status = entry["status"] if entry["status"] != "queued" else "starting"
        raise UserError(f"entry {entry_id} is {status}; only a queued entry can be cancelled")
    entry["status"] = "cancelled"
    atomic_write_json(path / ENTRY_FILE, entry)
    return entry


@dataclass
class Slot:
    """Where one run at a time trains: a GPU (``CUDA_VISIBLE_DEVICES``) or the CPU."""

    name: str  # "cuda:0", "cpu"
    env: dict

    @classmethod
    def gpu(cls, index: str) -> "Slot":
        return cls(f"cuda:{index}", {"CUDA_VISIBLE_DEVICES": index})

    @classmethod
    def cpu(cls, threads: int = 0) -> "Slot":
        """A CPU slot using ``threads`` cores (0: torch's default, all of them); runs sharing the
        CPU each need their share, or their threads wait on one another far longer than they work."""
        return cls("cpu", {"CUDA_VISIBLE_DEVICES": "", **({"OMP_NUM_THREADS": str(threads)} if threads else {})})


@dataclass
class _Running:
    entry: dict
    slot: Slot
    process: subprocess.Popen
    log: object


def _start(entry: dict, slot: Slot, root: Path) -> _Running:
    folder = queue_dir(root) / entry["id"]
    log = open(folder / "run.log", "w", encoding="utf-8")
    with open(folder / "result.json", "w", encoding="utf-8") as result:
        process = subprocess.Popen([sys.executable, "-m", "lorakit_ext", *entry["argv"], "--json"], cwd=entry.get("cwd"),
                                   env={**os.environ, **slot.env, "PYTHONUNBUFFERED": "1"}, stdout=result, stderr=log)
    entry.update(status="running", slot=slot.name, started_at=time.time(), pid=process.pid, host=socket.gethostname())
    atomic_write_json(folder / ENTRY_FILE, entry)
    return _Running(entry, slot, process, log)


def _finish(running: _Running, root: Path) -> dict:
    running.log.close()
    code = running.process.returncode
    running.entry.update(status=_STATUS.get(code, "failed"), exit_code=code)
    return _record_end(running.entry, root, f"exit code {code}")


def _record_end(entry: dict, root: Path, how: str) -> dict:
    folder = queue_dir(root) / entry["id"]
    entry.update(finished_at=time.time(), wall_s=round(time.time() - entry["started_at"], 3))
    result = _read_result(folder)
    if result is None:
        entry["error"] = f"the run ended without a result ({how}); its output is in {folder / 'run.log'}"
    else:
        entry["result"] = result
        if result.get("error"):
            entry["error"] = result["error"]
    atomic_write_json(folder / ENTRY_FILE, entry)
    return entry


def _orphans(entries: list[dict], root: Path, running: list[_Running]) -> list[dict]:
    """Entries marked running that no runner watches: an earlier runner stopped (killed, a power
    cut) while they ran. One that has ended since is recorded from its result file (its exit code
    is lost with the runner); the rest are still training and are returned, so that their projects
    count as busy (their entries are not waited for otherwise)."""
    ours = {r.entry["id"] for r in running}
    alive = []
    for entry in entries:
        if entry["status"] != "running" or entry["id"] in ours:
            continue
        if _gone(entry.get("pid"), entry.get("host")):
            result = _read_result(queue_dir(root) / entry["id"]) or {}
            entry.update(status=result.get("status") if result.get("status") in _STATUS.values() else "failed", exit_code=None)
            _record_end(entry, root, "the queue runner that started it stopped first")
        else:
            alive.append(entry)
    return alive


def _read_result(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_queue(root: Path, slots: list[Slot], *, should_stop: Callable[[], bool] = lambda: False,
              on_change: Callable[[dict], None] = lambda entry: None, poll_s: float = 0.5) -> list[dict]:
    """Runs the queued entries, one per slot at a time, until none is left (entries added
    meanwhile included); two entries of one project never run at once. ``should_stop``: start
    nothing more and wait for the running ones (Ctrl-C reaches them too: they save and stop).
    Returns the entries this call ran."""
    if not slots:
        raise UserError("no GPU or CPU slot to run the queue on")
    folder = queue_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    done: list[dict] = []
    running: list[_Running] = []
    with ProjectLock(folder, "running the training queue"):
        while True:
            for item in [r for r in running if r.process.poll() is not None]:
                running.remove(item)
                done.append(_finish(item, root))
                on_change(item.entry)
            entries = list_entries(root)
            orphans = _orphans(entries, root, running)
            if not should_stop():
                busy = {r.entry["project"] for r in running} | {e["project"] for e in orphans}
                for entry in entries:
                    slot = next((s for s in slots if not any(r.slot is s for r in running)), None)
                    if slot is None:
                        break
                    if _waiting(entry, root) and entry["project"] not in busy and _claim(queue_dir(root) / entry["id"]):
                        running.append(_start(entry, slot, root))
                        busy.add(entry["project"])
                        on_change(entry)
            waiting = any(_waiting(e, root) for e in list_entries(root)) and not should_stop()
            if not running and not waiting:
                return done
            time.sleep(poll_s)
