"""Which epoch to suggest, by a rule simple enough to show the user in full.

1. Candidates are the epochs whose grid column was measured and not flagged ("no visible effect",
   "overcooked"). Without any measured column every epoch is a candidate, unchecked; when every
   measured epoch is flagged there is no suggestion.
2. Among candidates the lowest validation loss wins; a tie (within 1e-9) goes to the earlier epoch.
3. Without validation losses the candidate closest to the training images (lowest likeness) wins;
   without that either, the last candidate epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit_ext.compare.epoch_metrics import EpochMeasures

TIE = 1e-9


@dataclass(frozen=True)
class EpochRow:
    epoch: int
    label: str
    validation_loss: float | None
    measures: EpochMeasures | None  # None when no grid was measured


@dataclass(frozen=True)
class Suggestion:
    epoch: int | None
    label: str | None
    reason: str  # one sentence naming the label and the number that decided


def rule_text() -> str:
    return (
        "Epochs whose grid images show no visible effect or look overcooked are left out; if that leaves none, "
        "nothing is suggested. "
        "Of the rest, the epoch with the lowest validation loss is suggested, the earlier one on a tie. "
        "Without validation losses, the epoch whose images come closest to the training images is suggested, "
        "and without training images either, the last epoch. "
        "Without a measured grid, effect and overcooking are not checked and every epoch takes part."
    )


def _flagged_summary(rows: list[EpochRow]) -> str:
    """``kat-01…kat-03 no visible effect, kat-10 overcooked``: runs of neighbouring epochs with the
    same flags share one entry."""
    runs: list[tuple[list[str], tuple[str, ...]]] = []
    for row in rows:
        if runs and runs[-1][1] == row.measures.flags:
            runs[-1][0].append(row.label)
        else:
            runs.append(([row.label], row.measures.flags))
    parts = []
    for labels, flags in runs:
        names = f"{labels[0]}…{labels[-1]}" if len(labels) > 2 else ", ".join(labels)
        parts.append(f"{names} {' and '.join(flags)}")
    return ", ".join(parts)


def _earliest_lowest(rows: list[EpochRow], value) -> EpochRow:
    best = min(value(row) for row in rows)
    return next(row for row in rows if value(row) <= best + TIE)


def suggest_epoch(rows: list[EpochRow]) -> Suggestion:
    rows = sorted(rows, key=lambda row: row.epoch)
    if not rows:
        return Suggestion(None, None, "no suggestion: there are no epochs to compare")
    measured = [row for row in rows if row.measures is not None]
    if measured:
        candidates = [row for row in measured if not row.measures.flags]
        if not candidates:
            return Suggestion(None, None, f"no suggestion: every measured epoch is flagged — {_flagged_summary(measured)}")
        among = "among epochs with a clear effect and no overcooking"
    else:
        candidates = rows
        among = "among all epochs; effect and overcooking were not checked (no grid)"
    with_loss = [row for row in candidates if row.validation_loss is not None]
    with_likeness = [row for row in candidates if row.measures is not None and row.measures.likeness is not None]
    if with_loss:
        row = _earliest_lowest(with_loss, lambda r: r.validation_loss)
        why = f"lowest validation loss ({row.validation_loss:.4g})"
    elif with_likeness:
        row = _earliest_lowest(with_likeness, lambda r: r.measures.likeness)
        why = f"no validation loss, closest to the training images (likeness {row.measures.likeness:.3f})"
    else:
        row = candidates[-1]
        why = f"no validation loss or training-image likeness, so the last epoch ({row.epoch})"
    return Suggestion(row.epoch, row.label, f"suggested: {row.label} — {why} {among}")
