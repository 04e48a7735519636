"""The run queue: trainings of several projects queued from the CLI (checked when added) run at
once, each with its own lock, run record and output; one project never trains twice at once."""

from __future__ import annotations

import json

import pytest
from tiny_datasets import fill_dataset

from lorakit_ext.cli import main
from lorakit_ext.project import create_project
from lorakit_ext.project_lock import ProjectBusy, ProjectLock
from lorakit_ext.run_queue import add_entry, list_entries, queue_dir, run_queue, Slot

SMALL = ["--set=resolution=64", "--set=min_bucket_reso=64", "--set=max_bucket_reso=128", "--set=optimizer=AdamW",
         "--set=network_dim=4", "--set=lr_scheduler=constant", "--set=keep_only_last_n_epochs=0",
         "--repeats", "1", "--batch-size", "2", "--epochs", "1"]


@pytest.fixture
def root(tmp_path):
    for name in ("kat", "rex"):
        fill_dataset(create_project(tmp_path, name).dataset)
    return tmp_path


def _add(root, project, model, *extra) -> dict:
    return add_entry(root, project, ["train", project, "--root", str(root), "--base-model", model, *SMALL, *extra])


def test_queued_runs_of_two_projects_train_at_once_each_with_its_own_record(root, tiny_sd15_dir, monkeypatch, capsys):
    model = str(tiny_sd15_dir / "tiny-sd15.safetensors")
    for project in ("kat", "kat"):
        assert main(["queue", "add", project, "--root", str(root), "--base-model", model, *SMALL, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["entry"]["status"] == "queued"
    monkeypatch.chdir(tiny_sd15_dir)  # a path relative to where it was added means the same when it runs
    assert main(["queue", "add", "rex", "--root", str(root), "--base-model", "tiny-sd15.safetensors", *SMALL]) == 0
    assert capsys.readouterr().out.startswith("queued ")
    monkeypatch.chdir(root)
    assert main(["queue", "run", "--root", str(root), "--cpu", "2", "--json"]) == 0
    ran = json.loads(capsys.readouterr().out)["entries"]
    assert [e["status"] for e in ran] == ["finished"] * 3, [e.get("error") for e in ran]
    kat = sorted((e for e in ran if e["project"] == "kat"), key=lambda e: e["started_at"])
    rex = next(e for e in ran if e["project"] == "rex")
    assert rex["started_at"] < kat[0]["finished_at"]  # two projects at once
    assert kat[1]["started_at"] >= kat[0]["finished_at"]  # one project never twice at once
    for name, count in (("kat", 2), ("rex", 1)):
        runs = sorted(p for p in (root / name / "runs").iterdir() if p.is_dir())
        assert len(runs) == count and {e["result"]["run_dir"] for e in ran if e["project"] == name} == {str(r) for r in runs}
        assert not (root / name / ".lorakit.lock").exists()
    # Each run its own stem: the second kat run never replaced the first one's file.
    assert sorted(p.name for p in (root / "kat" / "output").iterdir()) == ["kat-01.safetensors", "kat-v2-01.safetensors"]
    assert [e["status"] for e in list_entries(root)] == ["finished"] * 3
    assert not (queue_dir(root) / ".lorakit.lock").exists()


def test_an_entry_whose_project_is_busy_fails_alone_with_the_reason(root, tiny_sd15_dir):
    _add(root, "rex", str(tiny_sd15_dir / "tiny-sd15.safetensors"))
    with ProjectLock(root / "rex", "a caption run in the tab"):
        ran = run_queue(root, [Slot.cpu()], poll_s=0.1)
    assert [(e["status"], e["exit_code"]) for e in ran] == [("failed", 2)]
    assert "a caption run in the tab" in ran[0]["error"]
    assert not (root / "rex" / "runs").exists() or not any((root / "rex" / "runs").iterdir())


def test_a_second_queue_runner_is_refused_and_cancelled_entries_do_not_run(root, tiny_sd15_dir, capsys):
    entry = _add(root, "kat", str(tiny_sd15_dir / "tiny-sd15.safetensors"))
    with ProjectLock(queue_dir(root), "running the training queue"):
        with pytest.raises(ProjectBusy, match="running the training queue"):
            run_queue(root, [Slot.cpu()])
    assert main(["queue", "cancel", entry["id"], "--root", str(root)]) == 0
    assert capsys.readouterr().out.startswith(f"cancelled {entry['id']}")
    assert main(["queue", "cancel", entry["id"], "--root", str(root)]) == 2
    assert "is cancelled; only a queued entry can be cancelled" in capsys.readouterr().err
    # An entry the runner has claimed (about to start it) can no longer be cancelled, and vice versa.
    claimed = _add(root, "rex", str(tiny_sd15_dir / "tiny-sd15.safetensors"))
    (queue_dir(root) / claimed["id"] / ".claimed").touch()
    assert main(["queue", "cancel", claimed["id"], "--root", str(root)]) == 2
    assert "is starting" in capsys.readouterr().err
    assert main(["queue", "run", "--root", str(root), "--cpu", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == []  # neither the cancelled nor the claimed one ran
    assert [e["status"] for e in list_entries(root)] == ["cancelled", "queued"]
    assert not (root / "kat" / "runs").exists() or not any((root / "kat" / "runs").iterdir())


def test_a_bad_option_is_refused_when_added_not_when_its_turn_comes(root, tiny_sd15_dir, capsys):
    model = str(tiny_sd15_dir / "tiny-sd15.safetensors")
    assert main(["queue", "add", "kat", "--root", str(root), "--base-model", model, "--set=network_dim=-3"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["queue", "add", "kat", "--root", str(root), "--base-model", str(root / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert list_entries(root) == []


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_claim_or_a_run_left_by_a_runner_that_died_is_taken_back(root, tiny_sd15_dir):
    import os
    import socket

    host = socket.gethostname()
    model = str(tiny_sd15_dir / "tiny-sd15.safetensors")
    # Claimed by a runner that died before it started the run: the next runner runs it.
    claimed = _add(root, "kat", model)
    (queue_dir(root) / claimed["id"] / ".claimed").write_text(json.dumps({"pid": _dead_pid(), "host": host}))
    # Claimed by a live process (a cancel in its last millisecond): left alone.
    held = _add(root, "kat", model)
    (queue_dir(root) / held["id"] / ".claimed").write_text(json.dumps({"pid": os.getppid(), "host": host}))
    # Started by a runner that died; the run ended meanwhile and left its result, or left none.
    for project, result in (("rex", {"status": "finished", "files": []}), ("rex", None)):
        entry = _add(root, project, model)
        folder = queue_dir(root) / entry["id"]
        entry.update(status="running", pid=_dead_pid(), host=host, started_at=entry["added_at"])
        (folder / "entry.json").write_text(json.dumps(entry))
        if result is not None:
            (folder / ".claimed").touch()
            (folder / "result.json").write_text(json.dumps(result))
    ran = run_queue(root, [Slot.cpu()], poll_s=0.1)
    assert [(e["id"], e["status"]) for e in ran] == [(claimed["id"], "finished")], [e.get("error") for e in ran]
    statuses = {e["id"]: (e["status"], e.get("error", "")) for e in list_entries(root)}
    assert statuses[held["id"]] == ("queued", "")
    recovered = [statuses[e["id"]] for e in list_entries(root) if e["project"] == "rex"]
    assert recovered[0] == ("finished", "")
    assert recovered[1][0] == "failed" and "the queue runner that started it stopped first" in recovered[1][1]
