"""Regularisation images: prompts from the dataset's captions without the trigger, and the writer
that numbers them after what ``reg/`` holds, never replacing a file and stopping between images."""

from __future__ import annotations

import os

import pytest
from PIL import Image
from tiny_datasets import fill_dataset

from lorakit_ext.dataset.reg_images import (
    REG_LINE,
    dataset_reg_prompts,
    next_number,
    reg_prompts,
    with_reg_line,
    write_reg_images,
)
from lorakit_ext.errors import UserError
from lorakit_ext.project import create_project


@pytest.fixture
def project(tmp_path):
    made = create_project(tmp_path / "root", "kat")
    fill_dataset(made.dataset, count=3, trigger="Kat3r1na,  Green  Hair")
    return made


class Recorder:
    """A render that draws a flat image per call and remembers what it was asked."""

    def __init__(self, on_call=None):
        self.calls = []
        self.on_call = on_call or (lambda n: None)

    def __call__(self, prompt, seed):
        self.calls.append((prompt, seed))
        self.on_call(len(self.calls))
        return Image.new("RGB", (8, 8), (len(self.calls) * 20, 0, 0))


def pairs(folder):
    return sorted(p.name for p in folder.iterdir())


def test_prompts_drop_every_trigger_tag_ignoring_case_and_spacing_and_keep_the_rest_in_order():
    captions = ["kat3r1na, green hair, smile, red jacket", "smile, KAT3R1NA, Green  Hair", "kat3r1na", ""]
    assert reg_prompts(captions, "Kat3r1na, green hair") == ["smile, red jacket", "smile", "", ""]
    # A trigger of several words is one tag; its words alone are other tags.
    assert reg_prompts(["kat woman, kat, woman"], "kat woman") == ["kat, woman"]
    assert reg_prompts(["kat, smile"], "") == ["kat, smile"]
    assert reg_prompts(["a, b"], ["a", "x, b"]) == [""]


def test_project_prompts_are_one_per_image_and_an_empty_dataset_is_refused(project, tmp_path):
    assert dataset_reg_prompts(project, "kat3r1na, green hair") == [f"red hair, colour {i}, smile" for i in range(3)]
    empty = create_project(tmp_path / "root", "empty")
    with pytest.raises(UserError, match="import images first"):
        dataset_reg_prompts(empty, "kat")


def test_images_and_captions_follow_the_prompts_at_seed_plus_number(project):
    prompts = dataset_reg_prompts(project, "kat3r1na, green hair")
    render = Recorder()
    seen = []
    report = write_reg_images(project, prompts, render, seed=7, count=4, on_progress=lambda *a: seen.append(a))
    assert pairs(project.reg) == [f"reg-000{n}.{ext}" for n in range(1, 5) for ext in ("png", "txt")]
    # The prompts cycle when more images than captions are asked for.
    assert render.calls == [(prompts[0], 7), (prompts[1], 8), (prompts[2], 9), (prompts[0], 10)]
    assert (project.reg / "reg-0004.txt").read_text(encoding="utf-8") == prompts[0]
    assert Image.open(project.reg / "reg-0002.png").getpixel((0, 0)) == (40, 0, 0)
    assert [(done, total) for done, total, _ in seen] == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    assert seen[0][2] is None and seen[-1][2] == project.reg / "reg-0004.png" == report.written[-1]
    assert not report.stopped and "wrote 4 of 4" in report.text()


def test_default_count_is_one_per_dataset_image(project):
    report = write_reg_images(project, dataset_reg_prompts(project, "kat3r1na"), Recorder(), seed=0)
    assert report.asked == 3 and len(report.written) == 3


def test_the_users_files_are_never_replaced_and_numbering_continues_after_them(project):
    project.reg.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(project.reg / "reg-0001.png")
    (project.reg / "REG-0003.txt").write_text("mine")
    (project.reg / "notes.md").write_text("keep")
    before = {p.name: p.read_bytes() for p in project.reg.iterdir()}
    render = Recorder()
    write_reg_images(project, ["a", "b"], render, seed=100, count=2)
    assert {name: (project.reg / name).read_bytes() for name in before} == before
    assert sorted(set(pairs(project.reg)) - set(before)) == ["reg-0004.png", "reg-0004.txt", "reg-0005.png", "reg-0005.txt"]
    # Numbers, not runs, pick prompt and seed: the series goes on rather than repeating.
    assert render.calls == [("b", 103), ("a", 104)]


def test_a_file_the_user_adds_while_an_image_is_drawn_moves_the_pair_on(project):
    def user_adds(call):
        if call == 2:
            (project.reg / "reg-0002.png").write_bytes(b"the user's")

    write_reg_images(project, ["a"], Recorder(user_adds), seed=0, count=2)
    assert (project.reg / "reg-0002.png").read_bytes() == b"the user's"
    assert not (project.reg / "reg-0002.txt").exists()
    assert pairs(project.reg) == ["reg-0001.png", "reg-0001.txt", "reg-0002.png", "reg-0003.png", "reg-0003.txt"]


def test_a_failed_write_leaves_no_partial_file_and_every_file_is_published_atomically(project, monkeypatch):
    from lorakit_ext.dataset import reg_images

    published = []
    real = reg_images.atomic_write_bytes

    def recording(path, data, *, replace=True):
        published.append((path.name, replace))
        real(path, data, replace=replace)

    monkeypatch.setattr(reg_images, "atomic_write_bytes", recording)

    class Broken:
        def save(self, buffer, format):
            buffer.write(b"\x89PNG half")
            raise OSError("disk full")

    calls = iter([Image.new("RGB", (8, 8)), Broken()])
    with pytest.raises(OSError, match="disk full"):
        write_reg_images(project, ["a"], lambda prompt, seed: next(calls), seed=0, count=2)
    assert pairs(project.reg) == ["reg-0001.png", "reg-0001.txt"]
    assert published == [("reg-0001.txt", False), ("reg-0001.png", False)]
    # The caption goes first, so no image is ever without its caption.
    assert not [name for name in os.listdir(project.reg) if name.endswith(".tmp")]


def test_a_killed_runs_temp_files_go_and_everything_else_stays(project):
    project.reg.mkdir()
    dead = project.reg / ".reg-0001.png.99999999.abc.tmp"
    live = project.reg / f".reg-0002.png.{os.getpid()}.abc.tmp"
    users = project.reg / ".notes.md.99999999.abc.tmp"
    for path in (dead, live, users):
        path.write_bytes(b"half")
    write_reg_images(project, ["a"], Recorder(), seed=0, count=1)
    assert not dead.exists() and live.exists() and users.exists()


@pytest.mark.parametrize("how", ["between images", "while drawing", "render stopped"])
def test_stopping_leaves_complete_pairs_only(project, how):
    stop = {"now": False}

    def on_call(call):
        if call == 3:
            stop["now"] = True

    render = Recorder(on_call)
    if how == "render stopped":
        render = lambda prompt, seed: None if len(pairs(project.reg)) == 4 else Image.new("RGB", (8, 8))  # noqa: E731
    if how == "between images":
        should_stop = lambda: len(pairs(project.reg)) == 4  # noqa: E731
    else:
        should_stop = lambda: stop["now"]  # noqa: E731
    report = write_reg_images(project, ["a", "b"], render, seed=0, count=5, should_stop=should_stop)
    assert report.stopped and "stopped: wrote 2 of 5" in report.text()
    assert pairs(project.reg) == ["reg-0001.png", "reg-0001.txt", "reg-0002.png", "reg-0002.txt"]


def test_a_reg_folder_linking_out_of_the_project_is_refused(project, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, project.reg)
    with pytest.raises(UserError, match="symbolic link"):
        write_reg_images(project, ["a"], Recorder(), seed=0)
    assert list(outside.iterdir()) == []


def test_bad_counts_are_refused(project):
    with pytest.raises(UserError, match="at least 1"):
        write_reg_images(project, ["a"], Recorder(), seed=0, count=0)
    with pytest.raises(UserError, match="no captions"):
        write_reg_images(project, [], Recorder(), seed=0)


def test_next_number_reads_any_extension_and_case(tmp_path):
    assert next_number(tmp_path / "missing") == 1
    for name in ("reg-0009.PNG", "Reg-0012.txt", "reg-x.png", "reg-99", "other-0100.png"):
        (tmp_path / name).write_text("")
    assert next_number(tmp_path) == 13


def test_the_reg_line_is_added_once(project):
    assert with_reg_line("", project) == REG_LINE
    assert with_reg_line("  \n", project) == REG_LINE
    assert with_reg_line("2 /data/reg_woman", project) == f"2 /data/reg_woman\n{REG_LINE}"
    for named in ("1 reg", "3 reg/", f"2 {project.path}/reg", "# mine\n1 reg\n"):
        assert with_reg_line(named, project) == named
    assert with_reg_line("# 1 reg", project) == f"# 1 reg\n{REG_LINE}"
