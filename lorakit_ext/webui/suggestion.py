"""The suggested epoch in the WebUI: measured from the cells of A1111's own grid, kept in the
run folder (``epochs.json``), shown in the Compare tab and the job's status."""

from __future__ import annotations

from pathlib import Path

from lorakit_ext.compare.epoch_report import measure_grid, read_report, report_lines, report_of_run, training_thumbnails, write_report
from lorakit_ext.train.record import read_run


def measured_report(project, run_dir: Path, cells: dict) -> dict:
    """The run's report with the grid ``cells`` (A1111's X/Y/Z plot: ``(column, seed, weight)``)
    measured; written to the run folder."""
    from lorakit_ext.webui.xyz import BASELINE_LABEL

    embed = _clip_embedder()
    try:
        measures = measure_grid(cells, BASELINE_LABEL, training_thumbnails(project.dataset), embed)
    finally:
        if embed is not None:
            embed.release()
    report = report_of_run(read_run(run_dir), measures)
    write_report(run_dir, report)
    return report


def _clip_embedder():
    """CLIP for the likeness measure when Settings ask for it and a local model exists (else None:
    the measure is optional and never downloads)."""
    from lorakit_ext.compare.clip_likeness import ClipEmbedder, local_clip_model
    from lorakit_ext.webui.settings import setting

    if not setting("lorakit_clip_likeness"):
        return None
    folder = local_clip_model()
    if folder is None:
        return None
    from modules import devices

    return ClipEmbedder(folder, devices.device)


def saved_report(run_dir: Path) -> dict:
    """The run's last report, or one from its validation losses alone when no grid was measured."""
    return read_report(run_dir) or report_of_run(read_run(run_dir))


def report_text(report: dict) -> str:
    return "\n".join(report_lines(report))
