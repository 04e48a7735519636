"""Run safety: no run replaces a file it did not write, one writer per project, a resume that is
the same run, and one clean error (never a traceback) for every failure a user can meet."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tiny_datasets import fill_dataset

from lorakit_ext.cli import main
from lorakit_ext.project import create_project
from lorakit_ext.project_lock import LOCK_FILE, ProjectBusy, ProjectLock
from lorakit_ext.train.record import new_run_dir, read_run

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--set=resolution=64", "--set=min_bucket_reso=64", "--set=max_bucket_reso=128", "--set=optimizer=AdamW",
         "--set=network_dim=4", "--set=lr_scheduler=constant", "--set=keep_only_last_n_epochs=0",
         "--repeats", "1", "--batch-size", "2", "--epochs", "1"]


@pytest.fixture
def project(tmp_path):
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)
    return project


@pytest.fixture
def train_args(project, tiny_sd15_dir):
    return ["train", "kat", "--root", str(project.root), "--base-model", str(tiny_sd15_dir / "tiny-sd15.safetensors"), *SMALL]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def runs_of(project) -> list[Path]:
    return sorted(p for p in project.runs.iterdir() if p.is_dir())


# ---- no overwrite -----------------------------------------------------------------------------
def test_a_second_run_gets_its_own_stem_and_the_users_files_are_untouched(project, train_args, capsys):
    out = project.path / "output"
    out.mkdir()
    users_own = out / "kat-02.safetensors"
    users_own.write_bytes(b"the user's own LoRA, not ours")
    assert main([*train_args, "--epochs", "2", "--json"]) == 0
    first = last_json(capsys)
    assert [Path(f).name for f in first["files"]] == ["kat-v2-01.safetensors", "kat-v2-02.safetensors"]
    before = {f: sha(f) for f in first["files"]}
    assert main([*train_args, "--epochs", "1", "--json"]) == 0
    second = last_json(capsys)
    assert [Path(f).name for f in second["files"]] == ["kat-v3-01.safetensors"]
    assert {f: sha(f) for f in first["files"]} == before
    assert users_own.read_bytes() == b"the user's own LoRA, not ours"
    from lorakit_ext.export.writer import read_lora_metadata

    assert read_lora_metadata(second["files"][0])["ss_output_name"] == "kat-v3-01"
    assert read_run(project.runs / first["run"])["files"] == first["files"]


def test_a_file_that_appears_at_the_runs_path_is_never_replaced(project, tiny_sd15, monkeypatch):
    from lorakit_ext.models.ldm import LdmModel
    from lorakit_ext.train_config import TrainConfig
    from lorakit_ext.train.launch import BaseModel, open_run
    from lorakit_ext.train.loop import Trainer
    from lorakit_ext.train.preflight import preflight
    from lorakit_ext.errors import UserError

    config = TrainConfig(resolution=64, min_bucket_reso=64, max_bucket_reso=128, optimizer="AdamW", network_dim=4,
                         num_repeats=1, max_train_epochs=1).validate()
    out = project.path / "output"
    pre = preflight(project, config, out)
    job = open_run(project, config, out, pre, BaseModel("tiny"))
    # Another program writes the same name after the run chose it (a race no check can close).
    intruder = out / "kat-01.safetensors"
    intruder.write_bytes(b"someone else's")
    model = LdmModel(tiny_sd15[0], clip_skip=1, max_token_length=75)
    with pytest.raises(UserError, match="was not written by this run"):
        Trainer(model, job).run()
    assert intruder.read_bytes() == b"someone else's"
    record = read_run(job.run_dir)
    assert record["status"] == "failed" and "not written by this run" in record["error"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ---- one writer per project -------------------------------------------------------------------
def test_a_second_writer_process_is_refused_naming_the_holder(project, train_args):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; from lorakit_ext.project_lock import ProjectLock;"
         f"lock = ProjectLock({str(project.path)!r}, 'training (CLI)').acquire(); print('held', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (train_args, ["undo", "kat", "--root", str(project.root)]):
            done = subprocess.run([sys.executable, "-m", "lorakit_ext", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
            assert done.returncode == 2, done.stderr
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: project 'kat' is busy: training (CLI)")
            assert f"pid {holder.pid}" in lines[0]
        assert runs_of(project) == []
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_recovered_and_a_live_one_is_not(project):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    import socket

    (project.path / LOCK_FILE).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "started_at": 0, "purpose": "training"}))
    with ProjectLock(project.path, "undo"):
        with pytest.raises(ProjectBusy, match="busy: undo"):
            ProjectLock(project.path, "promote").acquire()
    assert not (project.path / LOCK_FILE).exists()
    # Another host's lock is never broken: its pid means nothing here.
    (project.path / LOCK_FILE).write_text(json.dumps({"pid": int(dead), "host": "elsewhere", "started_at": 0, "purpose": "training"}))
    with pytest.raises(ProjectBusy, match="on elsewhere"):
        ProjectLock(project.path, "undo").acquire()


def test_on_windows_a_liveness_check_asks_the_win32_api_and_never_signals(monkeypatch):
    from lorakit_ext import fsutil

    class Kernel32:  # the three calls, over a table of pid -> exit code (259: still running)
        codes = {10: 259, 11: 0}
        closed = []

        def OpenProcess(self, access, inherit, pid):
            return pid if pid in self.codes else 0

        def GetExitCodeProcess(self, handle, code):
            code._obj.value = self.codes[handle]
            return 1

        def CloseHandle(self, handle):
            self.closed.append(handle)

    last_error = {"value": 87}  # ERROR_INVALID_PARAMETER: no such process
    alive = lambda pid: fsutil.windows_pid_alive(pid, Kernel32(), lambda: last_error["value"])  # noqa: E731
    assert alive(10) and not alive(11) and not alive(12)
    last_error["value"] = 5  # ERROR_ACCESS_DENIED: it exists, another user's
    assert alive(12)
    assert Kernel32.closed == [10, 11]
    monkeypatch.setattr(fsutil.os, "name", "nt")
    monkeypatch.setattr(fsutil, "windows_pid_alive", lambda pid: pid == 10)
    monkeypatch.setattr(fsutil.os, "kill", lambda *a: pytest.fail("os.kill terminates a process on Windows"))
    assert fsutil.pid_alive(10) and not fsutil.pid_alive(11)


def test_run_folders_are_claimed_atomically(project):
    made, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        made.append(new_run_dir(project, "kat", {}))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8 and all(read_run(d)["status"] == "starting" for d in made)


# ---- resume -----------------------------------------------------------------------------------
def interrupt_after(monkeypatch, steps: int) -> None:
    """Ctrl-C (a real SIGINT to this process) once ``steps`` training steps have run."""
    from lorakit_ext.train import loop

    original, seen = loop.Trainer._report, {"n": 0}

    def report(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen["n"] += 1
        if seen["n"] == steps:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(loop.Trainer, "_report", report)


def test_the_printed_resume_command_works_as_pasted_and_refuses_changes(project, train_args, tmp_path, monkeypatch, capsys):
    interrupt_after(monkeypatch, 3)
    assert main([*train_args, "--epochs", "2", "--out", str(tmp_path / "loras")]) == 130
    printed = capsys.readouterr().out
    command = printed.split("resume with: ", 1)[1].strip()
    assert f"--root {project.root}" in command and "--base-model" not in command
    run_id = command.rsplit(" ", 1)[1]
    monkeypatch.undo()
    refused = ["--epochs", "5"], ["--set", "unet_lr=0.1"], ["--out", str(tmp_path)], ["--device", "cuda:7"]
    for extra in refused:
        assert main([*command.split()[3:], *extra]) == 2
        err = capsys.readouterr().err
        assert "continues run" in err and extra[0] in err
    monkeypatch.chdir(tmp_path)  # pasted anywhere: the record knows where everything is
    assert main([*command.split()[3:], "--json"]) == 0
    done = last_json(capsys)
    assert [Path(f).name for f in done["files"]] == ["kat-01.safetensors", "kat-02.safetensors"]
    assert all(Path(f).parent == tmp_path / "loras" for f in done["files"])
    assert main(command.split()[3:]) == 2
    assert f"run {run_id} finished" in capsys.readouterr().err


def test_resume_refuses_a_changed_dataset_unless_forced(project, train_args, monkeypatch, capsys):
    interrupt_after(monkeypatch, 2)
    assert main([*train_args, "--epochs", "2", "--json"]) == 130
    run_id = last_json(capsys)["run"]
    monkeypatch.undo()
    fill_dataset(project.dataset, count=5)
    resume = ["train", "kat", "--root", str(project.root), "--resume", run_id]
    assert main(resume) == 2
    assert "the dataset (images or captions) changed" in capsys.readouterr().err
    assert main([*resume, "--force", "--json"]) == 0
    assert last_json(capsys)["status"] == "finished"


def test_ctrl_c_while_caching_latents_says_nothing_was_saved(project, train_args, monkeypatch, capsys):
    from lorakit_ext.train import loop

    original = loop.Trainer._cache_latents

    def cache(self, items, buckets):
        os.kill(os.getpid(), signal.SIGINT)
        return original(self, items, buckets)

    monkeypatch.setattr(loop.Trainer, "_cache_latents", cache)
    assert main([*train_args, "--json"]) == 130
    out = last_json(capsys)
    assert out["status"] == "interrupted" and "resume" not in out
    record = read_run(project.runs / out["run"])
    assert record["status"] == "interrupted" and record["resumable"] is False
    assert not (project.runs / out["run"] / "state.pt").exists()


# ---- one error path ---------------------------------------------------------------------------
def one_error_line(capsys) -> str:
    """The one ``error:`` line on stderr (progress lines may precede it; a traceback may not)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_disk_full_while_saving_is_one_line_and_the_run_says_failed(project, train_args, monkeypatch, capsys):
    from lorakit_ext import fsutil

    real_fsync = fsutil.os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and ".safetensors." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device", "kat-01.safetensors")
        return real_fsync(fd)

    monkeypatch.setattr(fsutil.os, "fsync", fsync)
    assert main(train_args) == 2
    line = one_error_line(capsys)
    assert "the disk is full" in line and "free some space" in line
    (run,) = runs_of(project)
    assert read_run(run)["status"] == "failed" and "disk is full" in read_run(run)["error"]
    assert not [p for p in (project.path / "output").iterdir()]


def test_an_unexpected_error_at_save_is_one_line_with_the_traceback_saved(project, train_args, monkeypatch, capsys):
    from lorakit_ext.train import saving

    def broken(*args, **kwargs):
        raise RuntimeError("writer exploded")

    monkeypatch.setattr(saving, "write_lora_file", broken)
    assert main(train_args) == 2
    line = one_error_line(capsys)
    assert "unexpected RuntimeError: writer exploded" in line
    log = Path(line.rsplit("traceback in ", 1)[1].rstrip(")"))
    assert "Traceback" in log.read_text()
    assert read_run(runs_of(project)[0])["status"] == "failed"


def test_file_size_limit_is_one_line(project, train_args):
    # ulimit -f: writes past the limit fail with EFBIG (Python ignores SIGXFSZ).
    command = " ".join(map(repr, [sys.executable, "-m", "lorakit_ext", *train_args]))
    done = subprocess.run(["bash", "-c", f"ulimit -f 16; exec {command}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "largest size allowed" in errors[0] and "Traceback" not in done.stderr


@pytest.mark.parametrize("setting, field", [
    ("network_dim=1e400", "network_dim"), ("unet_lr=nan", "unet_lr"), ("caption_dropout_rate=NaN", "caption_dropout_rate"),
    ("text_encoder_lr=inf", "text_encoder_lr"), ("train_batch_size=true", "train_batch_size"),
])
def test_bad_numbers_are_refused_before_the_model_loads(project, tmp_path, setting, field, capsys):
    args = ["train", "kat", "--root", str(project.root), "--base-model", str(tmp_path / "not-even-there.safetensors"), "--set", setting]
    assert main(args) == 2
    assert field in one_error_line(capsys)
    assert runs_of(project) == []


def test_json_config_booleans_and_nan_are_refused(project, tmp_path, capsys):
    for values in ({"train_batch_size": True}, {"unet_lr": float("nan")}, {"min_snr_gamma": float("inf")}):
        config = tmp_path / "cfg.json"
        config.write_text(json.dumps(values))
        assert main(["plan", "kat", "--root", str(project.root), "--config", str(config)]) == 2
        assert next(iter(values)) in one_error_line(capsys)


def test_batch_larger_than_the_dataset_is_refused_before_the_model_loads(project, tmp_path, capsys):
    args = ["train", "kat", "--root", str(project.root), "--base-model", str(tmp_path / "none.safetensors"), "--batch-size", "9"]
    assert main(args) == 2
    assert "batch size 9 is larger than the 4 images" in one_error_line(capsys)
    assert runs_of(project) == []


def test_an_unsafe_pickle_is_named_as_such(project, tmp_path, capsys):
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Evil()}, ckpt)
    assert main(["train", "kat", "--root", str(project.root), "--base-model", str(ckpt)]) == 2
    line = one_error_line(capsys)
    assert "holds Python objects besides weights" in line and "download it again" not in line


def test_stale_temp_files_of_a_killed_run_are_cleaned_at_the_next_start(project, train_args, capsys):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    out = project.path / "output"
    out.mkdir()
    old_run = project.runs / "20260101-000000-kat"
    old_run.mkdir()
    stale = [out / f".kat-01.safetensors.{dead}.ab12cd.tmp", old_run / f".state.pt.{dead}.zz9.tmp"]
    kept = [out / f".kat-01.safetensors.{os.getpid()}.live.tmp", out / f".other-01.safetensors.{dead}.x.tmp", out / ".notes.tmp"]
    for path in stale + kept:
        path.write_bytes(b"partial")
    assert main([*train_args, "--epochs", "1"]) == 0
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_a_second_ctrl_c_stops_at_once_and_the_last_epoch_still_resumes(project, train_args, monkeypatch, capsys):
    from lorakit_ext.train import loop

    original, seen = loop.Trainer._report, {"n": 0}

    def report(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen["n"] += 1
        if seen["n"] == 3:  # in epoch 2, after epoch 1's state was saved
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.Trainer, "_report", report)
    assert main([*train_args, "--epochs", "2"]) == 130
    assert one_error_line(capsys) == "error: interrupted"
    (run,) = runs_of(project)
    record = read_run(run)
    assert record["status"] == "interrupted" and record["resumable"] is True
    monkeypatch.undo()
    assert main(["train", "kat", "--root", str(project.root), "--resume", run.name, "--json"]) == 0
    assert [Path(f).name for f in last_json(capsys)["files"]] == ["kat-01.safetensors", "kat-02.safetensors"]


@pytest.mark.parametrize("value", ["inf", "nan", "0", "1e400"])
def test_import_refuses_absurd_megapixels_in_one_line(project, tmp_path, value, capsys):
    assert main(["import", "kat", str(tmp_path), "--root", str(project.root), "--max-megapixels", value]) == 2
    assert "--max-megapixels must be a number above 0" in one_error_line(capsys)


def test_an_image_linked_out_of_the_dataset_is_refused_before_anything_reads_it(project, tmp_path, capsys):
    from lorakit_ext.caption.runner import caption_project
    from lorakit_ext.errors import UserError

    secret = tmp_path / "outside.png"
    (project.dataset / "img0.png").rename(secret)
    (project.dataset / "img0.png").symlink_to(secret)
    args = ["train", "kat", "--root", str(project.root), "--base-model", str(tmp_path / "none.safetensors")]
    assert main(args) == 2
    assert "symbolic link" in one_error_line(capsys) and runs_of(project) == []

    class NeverLoaded:
        name = "never"

        def load(self, device, dtype):
            raise AssertionError("the captioner must not load for a refused dataset")

    with pytest.raises(UserError, match="symbolic link"):
        caption_project(project, NeverLoaded(), mode="overwrite")
