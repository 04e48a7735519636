"""``reg-images``: regularisation images drawn headless on the tiny SD1.5 model into ``<project>/reg/``."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from tiny_datasets import fill_dataset

from lorakit_ext.cli import main
from lorakit_ext.project import create_project
from lorakit_ext.project_lock import ProjectLock

SMALL = ["--width", "64", "--height", "64", "--steps", "2", "--device", "cpu"]


@pytest.fixture
def project(tmp_path):
    made = create_project(tmp_path / "projects", "kat")
    fill_dataset(made.dataset, count=2, trigger="kat")
    return made


def command(project, checkpoint, *extra) -> list[str]:
    return ["reg-images", project.name, "--root", str(project.root), "--base-model", str(checkpoint), *SMALL, *extra]


def test_draws_captioned_images_without_the_trigger_and_continues_the_numbering(project, tiny_sd15_dir, capsys):
    checkpoint = tiny_sd15_dir / "tiny-sd15.safetensors"
    assert main(command(project, checkpoint, "--trigger", "KAT", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "done" and out["reg_line"] == "1 reg" and len(out["written"]) == 2
    files = sorted(p.name for p in project.reg.iterdir())
    assert files == [f"reg-000{n}.{ext}" for n in (1, 2) for ext in ("png", "txt")]
    assert [(project.reg / f"reg-000{n}.txt").read_text() for n in (1, 2)] == [f"red hair, colour {i}, smile" for i in range(2)]
    assert Image.open(project.reg / "reg-0001.png").size == (64, 64)
    first = (project.reg / "reg-0001.png").read_bytes()

    assert main(command(project, checkpoint, "--count", "1")) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("wrote 1 of 1 regularisation images") and "reg-0003.png" in lines[0]
    assert "no trigger was given" in captured.out and lines[-1] == "add this line to reg_folders: 1 reg"
    assert "reg-0003.png  1/1" in captured.err
    assert (project.reg / "reg-0001.png").read_bytes() == first
    # Image 3 takes caption 1 again (there are 2), whole without a trigger, at its own seed.
    assert (project.reg / "reg-0003.txt").read_text() == "kat, red hair, colour 0, smile"
    assert (project.reg / "reg-0003.png").read_bytes() != first


@pytest.mark.parametrize("extra, message", [
    (["--width", "100"], "--width 100 is not a positive multiple of 64"),
    (["--count", "0"], "--count 0: draw at least 1 image"),
    (["--steps", "0"], "--steps 0 is outside 1–1000"),
])
def test_bad_numbers_are_refused_with_one_error_line(project, tiny_sd15_dir, capsys, extra, message):
    assert main([*command(project, tiny_sd15_dir / "tiny-sd15.safetensors"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and message in err
    assert not project.reg.exists()


def test_missing_project_checkpoint_and_dataset_are_refused(project, tmp_path, tiny_sd15_dir, capsys):
    checkpoint = tiny_sd15_dir / "tiny-sd15.safetensors"
    assert main(["reg-images", "nobody", "--root", str(project.root), "--base-model", str(checkpoint)]) == 2
    assert "no project 'nobody'" in capsys.readouterr().err
    assert main(command(project, tmp_path / "missing.safetensors")) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = create_project(project.root, "empty")
    assert main(command(empty, checkpoint)) == 2
    assert "import images first" in capsys.readouterr().err


def test_a_busy_project_is_refused_before_the_model_loads(project, tmp_path, capsys):
    with ProjectLock(project.path, "training (CLI)"):
        # No checkpoint at all: the lock is checked before the model is looked at.
        assert main(command(project, tmp_path / "missing.safetensors")) == 2
    assert "is busy: training (CLI)" in capsys.readouterr().err
    assert not project.reg.exists()
