"""Progress lines for long CLI jobs, on stderr so ``--json`` output stays clean."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from typing import Callable, Iterator

from lorakit_ext.train.events import clock


class ProgressPrinter:
    """Prints a training progress line at most every ``interval`` seconds, and every message."""

    def __init__(self, interval: float = 2.0, stream=None):
        self.interval = interval
        self.stream = stream or sys.stderr
        self._last = 0.0

    def __call__(self, p) -> None:
        now = time.monotonic()
        if p.message:
            print(p.message, file=self.stream, flush=True)
            return
        if p.phase != "training" or (now - self._last < self.interval and p.step != p.total_steps):
            return
        self._last = now
        parts = [f"epoch {p.epoch}/{p.epochs}", f"step {p.step}/{p.total_steps}"]
        if p.loss is not None:
            parts.append(f"loss {p.loss:.4f}")
        if p.lr is not None:
            parts.append(f"lr {p.lr:.2e}")
        if p.it_per_s:
            parts.append(f"{p.it_per_s:.2f} it/s")
        parts.append(f"ETA {clock(p.eta_s) if p.eta_s is not None else '?'}")
        print("  ".join(parts), file=self.stream, flush=True)


@contextlib.contextmanager
def first_ctrl_c_stops(notice: str) -> Iterator[Callable[[], bool]]:
    """Gives a ``should_stop`` that turns true at the first Ctrl-C, which prints ``notice``; the
    second Ctrl-C interrupts at once (Python's own handler is back by then)."""
    asked = False

    def on_sigint(signum, frame):
        nonlocal asked
        asked = True
        if notice:
            print(notice, file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: asked
    finally:
        signal.signal(signal.SIGINT, previous)
