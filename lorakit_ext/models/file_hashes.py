"""A checkpoint file's hashes as A1111 and kohya record them, computed beside other work.

Hashing a 2–7 GB checkpoint takes seconds of one core (hashlib releases the GIL), so the CLI starts
it before it imports torch and the loader only waits for it once the model is built. Torch-free.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import BinaryIO, Iterator


def chunks(fh: BinaryIO) -> Iterator[memoryview]:
    """The rest of an unbuffered file in 8 MiB reads into one reused buffer (each chunk is valid
    until the next is read), for reading beside other work on a background thread. Each chunk
    takes the GIL twice, and beside a busy thread (the imports, the model build) each take can wait
    a switch interval: 1 MiB chunks made a 2 GB hash three times slower there. Much larger chunks
    fall out of the CPU cache before they are used."""
    buffer = memoryview(bytearray(1 << 23))
    while read := fh.readinto(buffer):
        yield buffer[:read]


def file_hashes(path: Path) -> tuple[str, str]:
    """(sha256 of the whole file, A1111's legacy hash: sha256 of the 64 KiB at offset 1 MiB, 8 digits)."""
    whole, legacy = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        for chunk in chunks(fh):
            whole.update(chunk)
        fh.seek(0x100000)
        legacy.update(fh.read(0x10000))
    return whole.hexdigest(), legacy.hexdigest()[:8]


def hashes_in_background(path: Path) -> Future:
    """:func:`file_hashes` of ``path`` on a daemon thread: a run that fails before it needs them
    exits without waiting for the rest of the file."""
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(file_hashes(path))
        except BaseException as exc:  # handed to whoever waits, as a ThreadPoolExecutor would
            future.set_exception(exc)

    threading.Thread(target=work, name="lorakit-hash", daemon=True).start()
    return future
