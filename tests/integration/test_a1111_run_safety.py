"""Run safety inside a real A1111 (in-process, see ``a1111_inprocess.py``; skipped unless
``LORAKIT_A1111_DIR`` is set): the user's LoRAs in ``models/Lora`` are never replaced, an
interrupted run resumes from the tab's Resume button, and the project's lock is shared between the
tab, the API and other processes.

    LORAKIT_A1111_DIR=/root/a1111h/webui PYTHONPATH=/work/main:<folder holding pytest> \\
        /root/a1111h/venv/bin/python -m pytest tests/integration/test_a1111_run_safety.py
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from a1111_inprocess import skip_reason
from test_ui_build import a1111, by_elem_id, deps_of, handler, picture, projects, tab, wrapped  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def small_config(name: str, epochs: int = 2):
    from lorakit_ext.train_config import TrainConfig

    return TrainConfig(output_name=name, trigger="kat3r1na", resolution=64, min_bucket_reso=64, max_bucket_reso=128,
                       num_repeats=2, max_train_epochs=epochs, train_batch_size=1, optimizer="AdamW")


def make_project(projects: Path):
    from lorakit_ext.project import create_project

    project = create_project(projects / "projects", "kat")
    for i in range(2):
        picture(project.dataset / f"{i}.png", i, (64, 64))
        (project.dataset / f"{i}.txt").write_text("kat3r1na, red", encoding="utf-8")
    return project


def test_resume_button_is_a_job_button(tab, wrapped):
    from lorakit_ext.webui import ui_train

    ids = by_elem_id(tab[0])
    (dep,) = deps_of(tab[0], ids["lorakit_train_resume"], "click")
    assert dep["js"] == "lorakit_start_training" and ui_train._resume in wrapped
    assert tab[0].blocks[dep["inputs"][2]].elem_id == "lorakit_train_resume_run"


def test_users_lora_kept_interrupted_run_resumed_from_the_tab(tab, projects, a1111, monkeypatch):
    from lorakit_ext.train import loop
    from lorakit_ext.train.record import read_run
    from lorakit_ext.webui import ui_form, ui_train

    monkeypatch.setitem(a1111.opts.data, "lorakit_auto_grid", False)
    make_project(projects)
    name = f"rs{int(time.time())}"
    lora_dir = Path(a1111.cmd_opts.lora_dir)
    users = lora_dir / f"{name}-01.safetensors"
    users.write_bytes(b"a LoRA the user made elsewhere")
    digest = hashlib.sha256(users.read_bytes()).hexdigest()

    original, seen = loop.Trainer._report, {"n": 0}

    def report(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen["n"] += 1
        if seen["n"] == 3:
            a1111.state.interrupt()  # the Interrupt button

    monkeypatch.setattr(loop.Trainer, "_report", report)
    config = small_config(name)
    *_, status = handler(tab[0], "lorakit_train_start")("task(rs1)", "kat", *ui_form.config_values(ui_train.SPECS, config))
    assert "Interrupted" in status, status
    monkeypatch.setattr(loop.Trainer, "_report", original)
    choices = ui_train.resumable_runs("kat")
    (run_id,) = choices["choices"]
    assert choices["value"] == run_id

    chart, files, samples, status = handler(tab[0], "lorakit_train_resume")("task(rs2)", "kat", run_id)
    assert "Finished" in status, status
    assert [row[0] for row in files["data"]] == [f"{name}-v2-01.safetensors", f"{name}-v2-02.safetensors"]
    assert hashlib.sha256(users.read_bytes()).hexdigest() == digest
    record = read_run(projects / "projects" / "kat" / "runs" / run_id)
    assert record["status"] == "finished" and record["steps_done"] == 8
    assert ui_train.resumable_runs("kat")["choices"] == []
    *_, status = handler(tab[0], "lorakit_train_resume")("task(rs3)", "kat", run_id)
    assert "finished" in status and "nothing to resume" in status


def test_the_lock_is_shared_between_the_tab_and_other_writers(tab, projects, a1111):
    from lorakit_ext.project_lock import ProjectLock
    from lorakit_ext.webui import jobs, ui_form, ui_train

    project = make_project(projects)
    with ProjectLock(project.path, "training (CLI)"):
        *_, status = handler(tab[0], "lorakit_train_start")("task(rs4)", "kat", *ui_form.config_values(ui_train.SPECS, small_config("rslock")))
        assert "busy: training (CLI)" in status, status
        with pytest.raises(Exception, match="busy: training"):
            jobs.start_training("kat", small_config("rslock"))
    assert not any(project.runs.iterdir())
