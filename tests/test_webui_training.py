"""Training requests inside A1111 (stand-ins for ``modules``): checked and locked at request time,
so bad settings, a busy project or a run that cannot resume are refused before anything queues."""

from __future__ import annotations

import json

import pytest
from test_webui_unit import a1111, client, project, wait_for  # noqa: F401 - fixtures

from lorakit_ext.project_lock import ProjectLock
from lorakit_ext.train.record import RUN_FILE

V1 = "/lorakit/v1"


def queued_jobs() -> int:
    from lorakit_ext.webui import jobs

    return len(jobs._jobs)


@pytest.mark.parametrize("config", [
    {"unet_lr": float("nan")}, {"text_encoder_lr": float("inf")}, {"network_dim": 1e400}, {"train_batch_size": True},
    {"caption_dropout_rate": float("-inf")},
])
def test_api_refuses_bad_numbers_at_request_time(client, project, config):
    before = queued_jobs()
    for route in ("plan", "train"):
        answer = client.post(f"{V1}/projects/kat/{route}", content=json.dumps({"config": config}),
                             headers={"content-type": "application/json"})
        assert answer.status_code == 400, answer.text
        assert next(iter(config)) in answer.json()["detail"]
    assert queued_jobs() == before


def test_a_batch_larger_than_the_dataset_is_refused_before_queuing(client, project):
    before = queued_jobs()
    answer = client.post(f"{V1}/projects/kat/train", json={"config": {"train_batch_size": 9}})
    assert answer.status_code == 400 and "larger than the 4 images" in answer.json()["detail"]
    assert queued_jobs() == before


def test_one_lock_for_the_tab_the_api_and_other_processes(a1111, client, project, monkeypatch):
    from lorakit_ext.webui import jobs

    path = a1111.projects / "kat"
    with ProjectLock(path, "training (CLI)"):
        answer = client.post(f"{V1}/projects/kat/train", json={"config": {}})
        assert answer.status_code == 409 and "busy: training (CLI)" in answer.json()["detail"]
        *_, status = jobs.train_in_gradio("task(t1)", "kat", "{}")
        assert "Failed" in status and "busy: training (CLI)" in status
    release, started = __import__("threading").Event(), __import__("threading").Event()

    def work(job, prepared):
        started.set()
        release.wait(10)

    monkeypatch.setattr(jobs, "_train", work)
    job_id = client.post(f"{V1}/projects/kat/train", json={"config": {}}).json()["job_id"]
    assert started.wait(10)
    *_, status = jobs.train_in_gradio("task(t2)", "kat", "{}")
    assert "busy: training (A1111, HTTP API)" in status
    assert client.post(f"{V1}/projects/kat/undo", json={}).status_code in (409,)
    release.set()
    assert wait_for(job_id)["status"] == "finished"
    with ProjectLock(path, "free again"):
        pass


def test_resume_and_runs_over_the_api(a1111, client, project):
    runs = a1111.projects / "kat" / "runs"
    finished = runs / "20260101-000000-kat"
    finished.mkdir(parents=True)
    (finished / RUN_FILE).write_text(json.dumps({"status": "finished", "output_name": "kat", "output_dir": "/x", "steps_done": 20}))
    stopped = runs / "20260102-000000-kat"
    stopped.mkdir()
    (stopped / RUN_FILE).write_text(json.dumps({"status": "interrupted", "output_name": "kat", "output_dir": "/x", "steps_done": 3}))
    listed = client.get(f"{V1}/projects/kat/runs").json()["runs"]
    assert [(r["run"], r["status"], r["resumable"]) for r in listed] == [
        ("20260102-000000-kat", "interrupted", False), ("20260101-000000-kat", "finished", False)]
    answer = client.post(f"{V1}/projects/kat/runs/20260101-000000-kat/resume", json={})
    assert answer.status_code == 400 and "finished" in answer.json()["detail"]
    answer = client.post(f"{V1}/projects/kat/runs/20260102-000000-kat/resume", json={})
    assert answer.status_code == 400 and "before it saved any state" in answer.json()["detail"]
    assert client.post(f"{V1}/projects/kat/runs/nope/resume", json={}).status_code == 400
    assert client.post(f"{V1}/projects/kat/runs/..%2F..%2Fetc/resume", json={}).status_code in (400, 404)


def test_a_new_run_never_takes_the_name_of_a_users_lora_in_any_subfolder(a1111, project):
    from pathlib import Path

    from lorakit_ext.train_config import TrainConfig
    from lorakit_ext.webui import training

    mine = Path(a1111.shared.cmd_opts.lora_dir) / "characters" / "kat-01.safetensors"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"the user's kat")
    prepared = training.prepare("kat", TrainConfig())
    try:
        assert prepared.preflight.output_stem == "kat-v2"
        assert prepared.output_dir == Path(a1111.shared.cmd_opts.lora_dir).resolve()
    finally:
        prepared.lock.release()
    assert mine.read_bytes() == b"the user's kat"
