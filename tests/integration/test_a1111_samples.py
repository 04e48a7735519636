"""Samples while training, drawn by A1111's own txt2img inside the training job (in-process, see
``a1111_inprocess.py``; skipped unless ``LORAKIT_A1111_DIR`` is set): they appear in the tab's
Samples gallery while the job runs and in the run folder, and the loaded model generates exactly as
before afterwards.

    LORAKIT_A1111_DIR=/root/a1111h/webui PYTHONPATH=/work/main:<folder holding pytest> \\
        /root/a1111h/venv/bin/python -m pytest tests/integration/test_a1111_samples.py
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from a1111_inprocess import skip_reason
from test_a1111_run_safety import make_project, small_config
from test_ui_build import a1111, handler, picture, projects, tab, wrapped  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def test_samples_drawn_by_a1111_show_in_the_gallery_and_change_nothing(tab, projects, a1111, monkeypatch):
    from PIL import Image

    from lorakit_ext.webui import bridge, jobs, ui_form, ui_train

    for key, value in (("lorakit_auto_grid", False), ("lorakit_grid_steps", 2)):
        monkeypatch.setitem(a1111.opts.data, key, value)
    make_project(projects)
    name = f"smp{int(time.time())}"
    sd_model = a1111.sd_model
    bridge.unmerge_networks(sd_model)
    before = bridge.fingerprint(sd_model)
    config = small_config(name).replace(sample_every_n_epochs=1, sample_prompt="kat3r1na, red\nkat3r1na, smile")
    _, files, samples, status = handler(tab[0], "lorakit_train_start")("task(smp1)", "kat", *ui_form.config_values(ui_train.SPECS, config))
    assert "Finished" in status, status
    job = jobs.job_status("task(smp1)")
    names = [Path(p).name for p in job["samples"]]
    assert names == [f"{name}-01-1.png", f"{name}-01-2.png", f"{name}-02-1.png", f"{name}-02-2.png"]
    assert all(Path(p).parent == Path(job["run_dir"]) / "samples" and Image.open(p).size == (64, 64) for p in job["samples"])
    # The gallery shows them, captioned by name.
    assert [caption for _, caption in samples] == [n.removesuffix(".png") for n in names]
    assert before.changes(bridge.fingerprint(sd_model)) == []
