"""``confine`` and the project functions against real symlinks inside the projects root that lead
out of it: a project folder, a dataset folder, an image file."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lorakit_ext.dataset.dedupe import plan_dedupe
from lorakit_ext.dataset.importer import import_files
from lorakit_ext.errors import UserError
from lorakit_ext.project import Project, confine, create_project, list_projects, open_project


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "projects"


@pytest.fixture
def outside(tmp_path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def picture(path: Path, colour=(200, 30, 30)) -> Path:
    Image.new("RGB", (64, 48), colour).save(path)
    return path


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_project_folder_linked_out_of_the_root_is_neither_listed_nor_opened(root, outside, tmp_path):
    create_project(root, "real")
    away = create_project(outside, "away")
    (root / "linked").symlink_to(away.path, target_is_directory=True)
    before = tree(outside)
    assert list_projects(root) == ["real"]
    with pytest.raises(UserError, match="symbolic link .*linked.*outside"):
        open_project(root, "linked")
    with pytest.raises(UserError, match="symbolic link"):
        create_project(root, "linked")
    upload = picture(tmp_path / "upload.png")
    with pytest.raises(UserError, match="symbolic link"):
        import_files(Project(root.resolve(), "linked"), [upload], ["a.png"])
    assert tree(outside) == before


def test_creating_a_project_through_a_dangling_link_makes_no_folder_outside(root, outside):
    root.mkdir()
    (root / "new").symlink_to(outside / "empty", target_is_directory=True)
    with pytest.raises(UserError, match="symbolic link"):
        create_project(root, "new")
    assert tree(outside) == []


def test_a_dataset_folder_linked_out_of_the_project_is_neither_listed_nor_opened(root, outside):
    project = create_project(root, "kat")
    picture(outside / "a.png")
    project.dataset.rmdir()
    project.dataset.symlink_to(outside, target_is_directory=True)
    assert list_projects(root) == []
    with pytest.raises(UserError, match="outside"):
        open_project(root, "kat")


def test_an_image_linked_out_of_the_dataset_is_refused(root, outside):
    project = create_project(root, "kat")
    secret = picture(outside / "secret.png")
    (project.dataset / "a.png").symlink_to(secret)
    picture(project.dataset / "b.png")
    # A link that stays inside the project is an ordinary file of it.
    (project.dataset / "c.png").symlink_to(project.dataset / "b.png")
    assert project.dataset_file("c.png") == (project.dataset / "b.png").resolve()
    with pytest.raises(UserError, match="symbolic link .*a.png"):
        project.dataset_file("a.png")
    with pytest.raises(UserError, match="a.png"):
        plan_dedupe(project, workers=1)


def test_a_link_into_another_allowed_folder_or_out_and_back_is_refused(root, outside, tmp_path):
    """The resolved path lies inside an allowed folder, but the link leaves the folder it sits in."""
    project = create_project(root, "kat")
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    (lora_dir / "kat-01.safetensors").write_bytes(b"x")
    (project.dataset / "epoch.safetensors").symlink_to(lora_dir / "kat-01.safetensors")
    with pytest.raises(UserError, match="symbolic link"):
        project.inside(project.dataset / "epoch.safetensors", lora_dir)
    assert project.inside(lora_dir / "kat-01.safetensors", lora_dir) == (lora_dir / "kat-01.safetensors").resolve()
    (outside / "back").symlink_to(project.dataset, target_is_directory=True)
    (project.dataset / "via").symlink_to(outside, target_is_directory=True)
    picture(project.dataset / "b.png")
    with pytest.raises(UserError, match="symbolic link .*via"):
        confine(project.dataset / "via" / "back" / "b.png", project.path)


def test_a_projects_root_that_is_itself_a_link_still_works(tmp_path, outside):
    """Only links below the root count: the root may live on another disk."""
    (tmp_path / "root-link").symlink_to(outside, target_is_directory=True)
    project = create_project(tmp_path / "root-link", "kat")
    assert list_projects(tmp_path / "root-link") == ["kat"]
    assert open_project(tmp_path / "root-link", "kat").dataset == project.dataset
    assert confine(project.dataset / "a.png", project.path) == (outside / "kat" / "dataset" / "a.png")
