"""What the Train and Compare sub-tabs show of a run: loss points, files, samples, runs, epochs.
Pure apart from reading a project's ``runs/`` records; no gradio, no A1111."""

from __future__ import annotations

import json
from pathlib import Path

from lorakit_ext.errors import UserError
from lorakit_ext.export.writer import epoch_from_file_name
from lorakit_ext.project import Project
from lorakit_ext.webui.ui_tables import file_size

FILE_HEADERS = ("epoch file", "size")


TRAINING, VALIDATION = "training", "validation"


def loss_columns(points, validation=()) -> dict[str, list] | None:
    """``{"step": […], "loss": […], "series": […]}`` for a line plot of the training losses
    ``[[step, loss], …]`` and the validation losses ``[[epoch, step, loss], …]`` (one line each);
    None with no points (an empty chart would draw axes around nothing)."""
    rows = [(int(s), float(v), TRAINING) for s, v in points or []]
    rows += [(int(s), float(v), VALIDATION) for _, s, v in validation or []]
    if not rows:
        return None
    return {"step": [r[0] for r in rows], "loss": [r[1] for r in rows], "series": [r[2] for r in rows]}


def file_rows(files) -> list[list]:
    rows = []
    for f in files or []:
        path = Path(f)
        size = file_size(path.stat().st_size) if path.is_file() else "gone"
        rows.append([path.name, size])
    return rows


def sample_items(samples, grid) -> list[tuple[str, str]]:
    """Gallery items: each sample image captioned by its file stem, then the epoch grid."""
    items = [(str(s), Path(s).stem) for s in samples or [] if Path(s).is_file()]
    if grid and Path(grid).is_file():
        items.append((str(grid), "epoch grid"))
    return items


def read_runs(project: Project) -> list[dict]:
    """The project's runs with a record, newest first: each ``run.json`` plus ``id``, ``trigger``
    (from the run's ``config.json``) and ``epochs``, its epoch files that still exist, in order."""
    if not project.runs.is_dir():
        return []
    runs = []
    for folder in sorted(project.inside(project.runs).iterdir(), reverse=True):
        try:
            info = json.loads((folder / "run.json").read_text(encoding="utf-8"))
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a run folder without a readable record: a crash before training began
        name = info.get("output_name", "")
        files = [Path(f) for f in info.get("files", []) if epoch_from_file_name(Path(f).name, name) is not None]
        existing = sorted((f for f in files if f.is_file()), key=lambda f: epoch_from_file_name(f.name, name))
        runs.append({**info, "id": folder.name, "trigger": config.get("trigger", ""), "epochs": existing})
    return runs


def run_choice(run: dict) -> str:
    return f"{run['id']} · {len(run['epochs'])} epoch files · {run.get('status', '?')}"


def find_run(runs: list[dict], choice: str | None) -> dict:
    for run in runs:
        if run_choice(run) == choice or run["id"] == choice:
            return run
    raise UserError("choose a training run first (train one in the Train tab, then press 🔄)")


def parse_numbers(text: str, kind, what: str, example: str) -> list:
    """``"1, 2,3"`` → ``[1, 2, 3]`` as ``kind``; :class:`UserError` naming ``what`` otherwise."""
    try:
        values = [kind(part) for part in str(text).replace(" ", "").split(",") if part]
    except ValueError:
        raise UserError(f"{what} {text!r} should be numbers separated by commas, e.g. {example}") from None
    return values


def cell_for(cells: dict, column: str, weight: float | None):
    """The grid cell of ``column`` for the preview: first seed, at ``weight`` when the grid has
    that weight, else at whatever weight it has."""
    matches = [(key, image) for key, image in cells.items() if key[0] == column]
    exact = [image for key, image in matches if weight is None or key[2] in (None, weight)]
    return (exact or [image for _, image in matches] or [None])[0]
