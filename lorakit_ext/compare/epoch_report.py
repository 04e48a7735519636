"""One run's epochs side by side: validation loss, what the grid shows of each, and the suggested
epoch, kept as ``epochs.json`` in the run folder so every front door shows the same numbers.

The grid measures come from :mod:`~lorakit_ext.compare.epoch_metrics`, the rule from
:mod:`~lorakit_ext.compare.suggest`; this module puts them together with the run's own record.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from lorakit_ext.compare.epoch_metrics import EpochMeasures, measure_epochs
from lorakit_ext.compare.suggest import EpochRow, rule_text, suggest_epoch
from lorakit_ext.dataset.files import list_images
from lorakit_ext.export.writer import SUFFIX, epoch_from_file_name
from lorakit_ext.fsutil import atomic_write_json

REPORT_FILE = "epochs.json"
# Enough training images to judge likeness; more only costs time.
THUMBNAILS = 32
THUMBNAIL_SIDE = 256


def training_thumbnails(dataset: Path, limit: int = THUMBNAILS) -> list[Image.Image]:
    """Small RGB copies of the first ``limit`` dataset images (unreadable ones left out)."""
    thumbnails = []
    for path in list_images(Path(dataset))[:limit]:
        try:
            with Image.open(path) as image:
                image.draft("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                small = image.convert("RGB")
                small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                thumbnails.append(small)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    return thumbnails


def measure_grid(cells: dict, baseline_label: str, training_images: list, embed=None) -> list[EpochMeasures] | None:
    """The grid's measures, or None for a grid without a no-LoRA column (nothing to compare with);
    ``embed``: a CLIP embedder for the CLIP likeness (None: not measured)."""
    if not any(label == baseline_label for label, _, _ in cells):
        return None
    return measure_epochs(cells, baseline_label, training_images, embed)


def build_report(output_name: str, labels: list[str], validation: list[dict], measures: list[EpochMeasures] | None) -> dict:
    """The report of epoch files ``labels`` (file stems) of the run named ``output_name``.
    ``validation`` is the run record's ``[{"epoch", "step", "loss"}, …]``."""
    losses = {row["epoch"]: row["loss"] for row in validation}
    measured = {m.label: m for m in measures or []}
    rows = []
    for label in labels:
        epoch = epoch_from_file_name(label + SUFFIX, output_name)
        if epoch is not None:
            rows.append(EpochRow(epoch, label, losses.get(epoch), measured.get(label)))
    rows.sort(key=lambda row: row.epoch)
    suggestion = suggest_epoch(rows)
    return {
        "epochs": [_row_dict(row) for row in rows],
        "suggestion": asdict(suggestion),
        "grid_measured": bool(measured),
        "rule": rule_text(),
    }


def report_of_run(record: dict, measures: list[EpochMeasures] | None = None) -> dict:
    """The report of a run record's (``run.json``'s) epoch files that still exist."""
    labels = [Path(f).stem for f in record.get("files", []) if Path(f).is_file()]
    return build_report(record["output_name"], labels, record.get("validation", []), measures)


def _row_dict(row: EpochRow) -> dict:
    out = {"epoch": row.epoch, "label": row.label, "validation_loss": row.validation_loss}
    if row.measures is not None:
        out.update({k: v for k, v in asdict(row.measures).items() if k != "label"})
        out["flags"], out["reasons"] = list(row.measures.flags), list(row.measures.reasons)
    return out


def write_report(run_dir: Path, report: dict) -> Path:
    path = Path(run_dir) / REPORT_FILE
    atomic_write_json(path, report)
    return path


def read_report(run_dir: Path) -> dict | None:
    """The run's saved report, or None when there is none (or it is unreadable: it is rebuilt)."""
    try:
        return json.loads((Path(run_dir) / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _number(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def report_lines(report: dict) -> list[str]:
    """The report as a small table and the suggestion, for the CLI and the tab."""
    width = max([len("epoch"), *(len(row["label"]) for row in report["epochs"])])
    clip = any(row.get("clip_likeness") is not None for row in report["epochs"])
    lines = [f"{'epoch':<{width}}  {'validation':>10}  {'effect':>6}  {'likeness':>8}  " + ("  CLIP  " if clip else "") + "flags"]
    for row in report["epochs"]:
        flags = ", ".join(row.get("flags", [])) or ("" if report["grid_measured"] else "(no grid)")
        lines.append(f"{row['label']:<{width}}  {_number(row['validation_loss'], 4):>10}  {_number(row.get('effect'), 3):>6}  "
                     f"{_number(row.get('likeness'), 3):>8}  " + (f"{_number(row.get('clip_likeness'), 3):>6}  " if clip else "") + flags)
    lines.append(report["suggestion"]["reason"])
    return lines
