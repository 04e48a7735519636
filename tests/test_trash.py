from __future__ import annotations

import hashlib
import json

import pytest

from lorakit_ext.cli import main
from lorakit_ext.dataset import trash
from lorakit_ext.dataset.trash import list_batches, move_to_removed, undo
from lorakit_ext.errors import UserError
from lorakit_ext.project import create_project


@pytest.fixture
def project(tmp_path):
    p = create_project(tmp_path / "root", "kat")
    (p.dataset / "a.png").write_bytes(b"image a")
    (p.dataset / "a.txt").write_text("a caption", encoding="utf-8")
    (p.dataset / "b.png").write_bytes(b"image b bytes")
    return p


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_move_writes_manifest_and_keeps_bytes(project):
    batch = move_to_removed(project, [project.dataset / "a.png", project.dataset / "a.txt"], "near-duplicate", {"clusters": [1]})
    assert not (project.dataset / "a.png").exists() and not (project.dataset / "a.txt").exists()
    assert batch.folder.parent == project.removed
    assert (batch.folder / "a.png").read_bytes() == b"image a"
    manifest = json.loads((batch.folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["id"] == batch.id and manifest["extra"] == {"clusters": [1]}
    assert manifest["files"] == [
        {
            "original_path": "dataset/a.png",
            "stored_name": "a.png",
            "sha256": hashlib.sha256(b"image a").hexdigest(),
            "size": 7,
            "reason": "near-duplicate",
        },
        {
            "original_path": "dataset/a.txt",
            "stored_name": "a.txt",
            "sha256": hashlib.sha256(b"a caption").hexdigest(),
            "size": 9,
            "reason": "near-duplicate",
        },
    ]


def test_same_name_from_two_folders_gets_distinct_stored_names(project, tmp_path):
    lora = tmp_path / "Lora"
    lora.mkdir()
    (lora / "a.png").write_bytes(b"other a")
    batch = move_to_removed(project, [project.dataset / "a.png", lora / "a.png"], "x", allowed_bases=[lora])
    stored = {f.original_path: (batch.folder / f.stored_name).read_bytes() for f in batch.files}
    assert stored == {"dataset/a.png": b"image a", str((lora / "a.png").resolve()): b"other a"}
    undo(project, allowed_bases=[lora])
    assert (lora / "a.png").read_bytes() == b"other a" and (project.dataset / "a.png").read_bytes() == b"image a"


def test_refuses_paths_outside_project_and_moves_nothing(project, tmp_path):
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(b"not ours")
    before = tree(project.path)
    with pytest.raises(UserError, match="outside"):
        move_to_removed(project, [project.dataset / "a.png", outside], "x")
    with pytest.raises(UserError, match="outside"):
        move_to_removed(project, [project.dataset / ".." / ".." / ".." / "elsewhere.png"], "x")
    assert outside.read_bytes() == b"not ours"
    assert tree(project.path) == before and list_batches(project) == []


def test_refuses_symlink_escaping_project(project, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"secret")
    (project.dataset / "link.png").symlink_to(outside)
    with pytest.raises(UserError):
        move_to_removed(project, [project.dataset / "link.png"], "x")
    assert outside.read_bytes() == b"secret" and (project.dataset / "link.png").is_symlink()


def test_undo_restores_exactly_and_only_once(project):
    before = tree(project.dataset)
    first = move_to_removed(project, [project.dataset / "a.png", project.dataset / "a.txt"], "x")
    second = move_to_removed(project, [project.dataset / "b.png"], "y")
    assert undo(project).id == second.id
    assert (project.dataset / "b.png").read_bytes() == b"image b bytes"
    assert undo(project).id == first.id
    assert tree(project.dataset) == before
    with pytest.raises(UserError, match="nothing to undo"):
        undo(project)
    with pytest.raises(UserError, match="already restored"):
        undo(project, first.id)
    assert tree(project.dataset) == before
    assert [b.restored for b in list_batches(project)] == [True, True]


def test_undo_refuses_when_original_is_occupied_and_moves_nothing(project):
    batch = move_to_removed(project, [project.dataset / "a.png", project.dataset / "b.png"], "x")
    (project.dataset / "b.png").write_bytes(b"a new file the user made")
    with pytest.raises(UserError, match="b.png exists now"):
        undo(project)
    assert (project.dataset / "b.png").read_bytes() == b"a new file the user made"
    assert not (project.dataset / "a.png").exists()
    assert (batch.folder / "a.png").read_bytes() == b"image a"
    assert not list_batches(project)[0].restored


def test_undo_refuses_a_changed_stored_file(project):
    batch = move_to_removed(project, [project.dataset / "a.png"], "x")
    (batch.folder / "a.png").write_bytes(b"tampered")
    with pytest.raises(UserError, match="changed since it was removed"):
        undo(project)
    assert not (project.dataset / "a.png").exists()


def test_undo_finishes_a_batch_that_was_interrupted_half_way(project):
    batch = move_to_removed(project, [project.dataset / "a.png", project.dataset / "b.png"], "x")
    # As if the process had died after writing the manifest and moving only a.png.
    (batch.folder / "b.png").rename(project.dataset / "b.png")
    undo(project)
    assert (project.dataset / "a.png").read_bytes() == b"image a"
    assert (project.dataset / "b.png").read_bytes() == b"image b bytes"


def test_failed_move_puts_everything_back(project, monkeypatch):
    before = tree(project.path)
    real_move = trash.move_no_clobber

    def fail_on_b(src, dst):
        if src.name == "b.png" and dst.parent.parent == project.removed:
            raise OSError("disk full")
        real_move(src, dst)

    monkeypatch.setattr(trash, "move_no_clobber", fail_on_b)
    with pytest.raises(OSError, match="disk full"):
        move_to_removed(project, [project.dataset / "a.png", project.dataset / "b.png"], "x")
    assert tree(project.path) == before
    assert list(project.removed.iterdir()) == []


def test_file_already_in_trash_or_missing_is_refused(project):
    batch = move_to_removed(project, [project.dataset / "a.png"], "x")
    with pytest.raises(UserError, match="already in"):
        move_to_removed(project, [batch.folder / "a.png"], "x")
    with pytest.raises(UserError, match="not a file"):
        move_to_removed(project, [project.dataset / "a.png"], "x")


def test_cli_undo_list_and_restore(project, capsys):
    batch = move_to_removed(project, [project.dataset / "a.png"], "near-duplicate")
    root = str(project.root)
    assert main(["undo", "kat", "--list", "--root", root]) == 0
    assert batch.id in capsys.readouterr().out
    assert main(["undo", "kat", "--root", root, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["batch"]["id"] == batch.id and data["batch"]["restored"] is True
    assert (project.dataset / "a.png").read_bytes() == b"image a"
    assert main(["undo", "kat", batch.id, "--root", root]) == 2
    assert "already restored" in capsys.readouterr().err
