"""What the trainer tells its callers while it works, and how it is told to stop.

Front ends map :class:`Progress` onto their own display (the A1111 bridge onto ``shared.state``,
the CLI onto a line of text); the core never imports them.
"""

from __future__ import annotations

from dataclasses import dataclass

PHASES = ("caching", "training", "validating", "saving", "sampling", "captioning")


def clock(seconds: float) -> str:
    """Seconds as ``m:ss`` or ``h:mm:ss``, for ETAs."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Interrupted(Exception):
    """The user asked to stop (A1111's Interrupt button, Ctrl-C, an API call). Raised at a safe
    point, between VAE batches or training steps, so the trainer can save what it has."""

    def __init__(self, message: str = "interrupted by the user"):
        super().__init__(message)


@dataclass(frozen=True)
class Progress:
    phase: str
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    message: str = ""
    validation_loss: float | None = None  # with phase "validating", once measured

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"unknown progress phase {self.phase!r}; one of {', '.join(PHASES)}")
