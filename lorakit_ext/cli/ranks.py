"""``train --gpus N``: starts the training command once per GPU, as ``torchrun --nproc-per-node N``
would, and waits for all of them.

Rank 0 prints progress and the result on this terminal; the other ranks write to a log file each,
named if they fail. A rank that fails stops the others (they would wait for it until the
collectives time out). Ctrl-C reaches every rank, which stop together after the current step, save
and end; this process only waits for them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorakit_ext.cli.output import Result
from lorakit_ext.errors import UserError


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(argv: list[str], processes: int) -> Result:
    """``train --gpus N``: rank 0 prints on this terminal."""
    return Result(exit_code=run_ranks(argv, processes), printed=True)


def run_ranks(argv: list[str], processes: int, *, stdout=None) -> int:
    """Runs ``python -m lorakit_ext *argv`` in ``processes`` ranks on this machine; rank 0's
    output goes to ``stdout`` (a file; default this terminal). Returns rank 0's exit code, or 2
    when another rank failed (named on stderr)."""
    if processes < 1:
        raise UserError(f"--gpus {processes}: give the number of GPUs to train on (1 or more)")
    # As torchrun: each rank its share of the cores unless told otherwise (ranks on the CPU whose
    # threads outnumber the cores wait on one another far longer than they work).
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // processes))
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(processes),
            "LOCAL_WORLD_SIZE": str(processes), "OMP_NUM_THREADS": threads}
    logs = [None] + [Path(tempfile.gettempdir()) / f"lorakit-rank{r}-{os.getpid()}.log" for r in range(1, processes)]
    ranks = []
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the ranks, which save first
    try:
        for rank in range(processes):
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            out = stdout if rank == 0 else open(logs[rank], "w", encoding="utf-8")
            ranks.append(subprocess.Popen([sys.executable, "-m", "lorakit_ext", *argv], env=env, stdout=out,
                                          stderr=None if rank == 0 else subprocess.STDOUT))
            if rank:
                out.close()
        failed = _wait(ranks)
    finally:
        signal.signal(signal.SIGINT, previous)
    code = ranks[0].returncode
    if failed is not None:
        print(f"error: rank {failed} of {processes} stopped with exit code {ranks[failed].returncode}; its output is in "
              f"{logs[failed]}", file=sys.stderr)
        code = code or 2
    for rank, log in enumerate(logs):
        if log is not None and ranks[rank].returncode == 0:
            log.unlink(missing_ok=True)
    return code


def _stop(ranks: list[subprocess.Popen]) -> None:
    for p in ranks:
        if p.poll() is None:
            p.terminate()
    for p in ranks:
        p.wait()


def _wait(ranks: list[subprocess.Popen], grace_s: float = 30.0) -> int | None:
    """Waits for every rank. A rank other than 0 that fails (not a Ctrl-C stop) stops the rest and
    is returned; ranks still running a while after rank 0 ended have nothing left to write and are
    stopped too."""
    rank0_ended = None
    while any(p.poll() is None for p in ranks):
        failed = next((r for r, p in enumerate(ranks) if r and p.returncode not in (None, 0, 130)), None)
        if failed is not None:
            _stop(ranks)
            return failed
        if ranks[0].returncode is not None:
            rank0_ended = rank0_ended or time.monotonic()
            if time.monotonic() - rank0_ended > grace_s:
                _stop(ranks)
        time.sleep(0.2)
    return None
