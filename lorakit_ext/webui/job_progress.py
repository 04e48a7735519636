"""A job's progress in A1111's terms: ``shared.state`` drives the WebUI's progress bar, its ETA and
the text before them, which A1111 shows for whatever job holds the queue.

One ETA is shown: A1111's bar always appends its own, ``elapsed × (1 − progress) / progress`` with
``elapsed`` counted from ``state.time_start``. Counted from the job's start it would include the
latent caching and the warm-up, so early in a run it would be far off; the trainer's ETA counts
the steps alone. So the text carries none, and ``time_start`` is set back from the trainer's ETA so
that A1111's formula gives exactly it (the API's ``eta_s`` and the bar agree). A grid restarts the
clock and the counts: its cells are a job of their own in the bar.
"""

from __future__ import annotations

import math
import time

from lorakit_ext.train.events import Progress


def textinfo(p: Progress) -> str:
    """``epoch 3/10 · step 120/630 · loss 0.1234 · 2.1 it/s``; what is unknown is left out."""
    parts = [f"epoch {p.epoch}/{p.epochs}", f"step {p.step}/{p.total_steps}"]
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.it_per_s:
        parts.append(f"{p.it_per_s:.1f} it/s")
    if p.phase in ("saving", "validating"):
        parts.append(p.phase)
    return " · ".join(parts)


def a1111_progress(state) -> float:
    """The fraction A1111's bar shows (``modules/progress.py``)."""
    progress = 0.0
    if state.job_count > 0:
        progress += state.job_no / state.job_count
        if state.sampling_steps > 0:
            progress += state.sampling_step / state.sampling_steps / state.job_count
    return min(progress, 1.0)


class StateMirror:
    """Shows a training job's :class:`Progress` in ``shared.state``: one A1111 "job" per epoch and
    its steps as sampling steps. A1111 computes progress as ``job_no / job_count`` plus
    ``sampling_step / sampling_steps / job_count``, so the sampling steps count within the epoch;
    the steps left are spread evenly over the epochs left (exact unless max_train_steps cuts the
    last epoch short)."""

    def __init__(self, state):
        self.state = state
        self.epoch = 0
        self.epoch_start = 0

    def __call__(self, p: Progress) -> None:
        state = self.state
        if p.phase == "caching":
            state.textinfo = p.message or "caching latents"
            return
        if not p.total_steps:
            return  # a note between steps ("CUDA graphs off"): the job's message, not the bar's
        if p.epoch != self.epoch:
            # The first report of an epoch comes after its first step.
            self.epoch, self.epoch_start = p.epoch, max(p.step - 1, 0)
        size = max(1, math.ceil((p.total_steps - self.epoch_start) / max(1, p.epochs - p.epoch + 1)))
        state.job_count = p.epochs
        state.job_no = max(p.epoch - 1, 0)
        state.sampling_steps = size
        state.sampling_step = min(max(p.step - self.epoch_start, 0), size)
        state.textinfo = textinfo(p)
        progress = a1111_progress(state)
        if p.eta_s is not None and 0 < progress < 1:
            state.time_start = time.time() - p.eta_s * progress / (1 - progress)


def grid_started(state, cells: int) -> None:
    """An epoch grid of ``cells`` images begins (the X/Y/Z script counts them as A1111 jobs)."""
    state.job_count, state.job_no = cells, 0
    state.sampling_step = state.sampling_steps = 0
    state.time_start = time.time()
    state.textinfo = f"epoch grid · {cells} cells"


def grid_cell(state, number: int, cells: int) -> None:
    state.textinfo = f"epoch grid · cell {number}/{cells}"
