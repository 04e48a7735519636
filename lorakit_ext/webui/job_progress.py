"""A training job's progress in A1111's terms: ``shared.state`` drives the WebUI's progress bar, its
ETA and the text under it, which A1111 shows for whatever job holds the queue."""

from __future__ import annotations

import math

from lorakit_ext.train.events import Progress, clock


def textinfo(p: Progress) -> str:
    """``epoch 3/10 · step 120/630 · loss 0.1234 · 2.1 it/s · ETA 4:56``; what is unknown is left out."""
    parts = [f"epoch {p.epoch}/{p.epochs}", f"step {p.step}/{p.total_steps}"]
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.it_per_s:
        parts.append(f"{p.it_per_s:.1f} it/s")
    if p.eta_s is not None:
        parts.append(f"ETA {clock(p.eta_s)}")
    if p.phase == "saving":
        parts.append("saving")
    return " · ".join(parts)


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
        if p.epoch != self.epoch:
            # The first report of an epoch comes after its first step.
            self.epoch, self.epoch_start = p.epoch, max(p.step - 1, 0)
        size = max(1, math.ceil((p.total_steps - self.epoch_start) / max(1, p.epochs - p.epoch + 1)))
        state.job_count = p.epochs
        state.job_no = max(p.epoch - 1, 0)
        state.sampling_steps = size
        state.sampling_step = min(max(p.step - self.epoch_start, 0), size)
        state.textinfo = textinfo(p)
