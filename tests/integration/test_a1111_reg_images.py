"""Regularisation images drawn from the Train tab by A1111's own txt2img on the loaded model
(in-process, see ``a1111_inprocess.py``; skipped unless ``LORAKIT_A1111_DIR`` is set): the pairs in
``<project>/reg/``, "Regularisation folders" filled, Interrupt keeping complete pairs only, and the
model untouched.

    LORAKIT_A1111_DIR=/root/a1111h/webui PYTHONPATH=/work/main:<folder holding pytest> \\
        /root/a1111h/venv/bin/python -m pytest tests/integration/test_a1111_reg_images.py
"""

from __future__ import annotations

import pytest
from a1111_inprocess import skip_reason
from test_a1111_run_safety import make_project
from test_ui_build import a1111, handler, projects, tab, wrapped  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_two_images_from_the_tab_fill_the_reg_folders_field(tab, projects, a1111):
    from PIL import Image

    from lorakit_ext.webui import bridge

    project = make_project(projects)
    project.reg.mkdir()
    (project.reg / "reg-0001.png").write_bytes(b"the user's own")
    sd_model = a1111.sd_model
    bridge.unmerge_networks(sd_model)
    before = bridge.fingerprint(sd_model)
    generate = handler(tab[0], "lorakit_reg_start")
    gallery, folders, message = generate("task(reg1)", "kat", 2, 2, "kat3r1na", 42, 64, "")
    assert "wrote 2 of 2 regularisation images" in message and "Time taken" in message, message
    assert folders == "1 reg"
    assert files(project.reg) == ["reg-0001.png", "reg-0002.png", "reg-0002.txt", "reg-0003.png", "reg-0003.txt"]
    assert (project.reg / "reg-0001.png").read_bytes() == b"the user's own"
    # The captions without the activation tag, as the prompts were.
    assert [(project.reg / f"reg-000{n}.txt").read_text(encoding="utf-8") for n in (2, 3)] == ["red", "red"]
    assert all(Image.open(project.reg / f"reg-000{n}.png").size == (64, 64) for n in (2, 3))
    assert [caption for _, caption in gallery] == ["reg-0002", "reg-0003"]
    assert before.changes(bridge.fingerprint(sd_model)) == []
    # Drawn again, the field keeps its line and the numbering goes on.
    _, folders, message = generate("task(reg2)", "kat", 1, 2, "kat3r1na", 42, 64, "2 /data/other\n1 reg")
    assert folders == "2 /data/other\n1 reg" and "reg-0004.png" in message, message


def test_interrupt_keeps_the_images_finished_before_it(tab, projects, a1111, monkeypatch):
    from lorakit_ext.webui import samples

    project = make_project(projects)
    real = samples.txt2img
    calls = []

    def interrupted_during_the_second(*args):
        calls.append(args)
        images = real(*args)
        if len(calls) == 2:
            a1111.state.interrupt()
        return images

    monkeypatch.setattr(samples, "txt2img", interrupted_during_the_second)
    _, folders, message = handler(tab[0], "lorakit_reg_start")("task(reg3)", "kat", 4, 2, "kat3r1na", 42, 64, "")
    assert "stopped: wrote 1 of 4" in message, message
    assert len(calls) == 2 and files(project.reg) == ["reg-0001.png", "reg-0001.txt"]
    assert folders == "1 reg"
