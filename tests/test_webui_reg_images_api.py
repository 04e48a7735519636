"""``POST /lorakit/v1/projects/{name}/reg-images`` with A1111's ``modules`` stood in for (see
test_webui_unit.py) and txt2img replaced by a recorder: the pairs it writes into ``reg/``, its
defaults, its refusals before anything queues, the project's lock, and Interrupt."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import test_webui_unit
from PIL import Image
from test_webui_unit import wait_for

from lorakit_ext.project import create_project
from lorakit_ext.project_lock import ProjectLock

V1 = "/lorakit/v1"

# test_webui_unit's stand-ins for A1111, as this module's fixtures (pytest finds them by name here).
a1111, client, project = test_webui_unit.a1111, test_webui_unit.client, test_webui_unit.project


class Txt2Img:
    """Stands in for ``samples.txt2img``: records each call and returns one flat image. ``hold``
    makes call number ``hold`` wait for ``release`` or A1111's Interrupt, as a long image would."""

    def __init__(self, state):
        self.state = state
        self.calls = []
        self.hold = None
        self.holding, self.release = threading.Event(), threading.Event()

    def __call__(self, prompt, seed, width, height, steps):
        self.calls.append({"prompt": prompt, "seed": seed, "size": (width, height), "steps": steps})
        if len(self.calls) == self.hold:
            self.holding.set()
            while not (self.release.is_set() or self.state.interrupted):
                time.sleep(0.01)
        # A1111 hands back the image it reached also when interrupted.
        return [Image.new("RGB", (width, height), (len(self.calls) * 40, 0, 0))]


@pytest.fixture
def txt2img(a1111, monkeypatch):
    from lorakit_ext.webui import samples

    fake = Txt2Img(a1111.shared.state)
    monkeypatch.setattr(samples, "txt2img", fake)
    yield fake
    fake.release.set()


def reg_files(a1111) -> list[str]:
    folder = a1111.projects / "kat" / "reg"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def queued_jobs() -> set:
    from lorakit_ext.webui import jobs

    return set(jobs._jobs)


def lock_is_free(a1111) -> bool:
    with ProjectLock(a1111.projects / "kat", "checking"):
        return True


def test_two_images_are_drawn_after_the_users_files_as_a_job(a1111, client, project, txt2img):
    reg = a1111.projects / "kat" / "reg"
    reg.mkdir()
    (reg / "reg-0001.png").write_bytes(b"the user's own")
    body = {"trigger": "kat", "count": 2, "steps": 3, "seed": 7, "width": 64, "height": 128}
    answer = client.post(f"{V1}/projects/kat/reg-images", json=body)
    assert answer.status_code == 202, answer.text
    job = wait_for(answer.json()["job_id"])
    assert (job["status"], job["kind"], job["project"], job["step"], job["total_steps"]) == ("finished", "reg-images", "kat", 2, 2)
    assert job["files"] == [str(reg / "reg-0002.png"), str(reg / "reg-0003.png")]
    assert "wrote 2 of 2 regularisation images" in job["message"] and "'1 reg'" in job["message"], job["message"]
    assert reg_files(a1111) == ["reg-0001.png", "reg-0002.png", "reg-0002.txt", "reg-0003.png", "reg-0003.txt"]
    assert (reg / "reg-0001.png").read_bytes() == b"the user's own"
    # Image n takes caption n (cycling) at seed + n - 1, the trigger left out.
    assert [(c["prompt"], c["seed"], c["size"], c["steps"]) for c in txt2img.calls] == [
        ("red hair, colour 1, smile", 8, (64, 128), 3), ("red hair, colour 2, smile", 9, (64, 128), 3)]
    assert (reg / "reg-0002.txt").read_text(encoding="utf-8") == "red hair, colour 1, smile"
    assert Image.open(reg / "reg-0003.png").size == (64, 128)
    assert a1111.shared.state.begun[-1] == "lorakit-reg-images" and a1111.shared.state.job_count == 0
    assert lock_is_free(a1111)


def test_defaults_one_image_per_dataset_image_at_the_loaded_familys_size(a1111, client, project, txt2img, monkeypatch):
    from lorakit_ext.models import families

    job = wait_for(client.post(f"{V1}/projects/kat/reg-images", json={}).json()["job_id"])
    assert job["status"] == "finished" and len(job["files"]) == 4
    # No trigger: the captions as they are; SD1.5's 512² and seed 42 with no model loaded.
    assert [(c["prompt"], c["seed"], c["size"], c["steps"]) for c in txt2img.calls] == [
        (f"kat, red hair, colour {i}, smile", 42 + i, (512, 512), 20) for i in range(4)]
    txt2img.calls.clear()
    monkeypatch.setattr(families, "defaults_of_model", lambda sd_model: dict(families.SDXL.defaults))
    job = wait_for(client.post(f"{V1}/projects/kat/reg-images", json={"count": 1, "width": 832}).json()["job_id"])
    assert job["status"] == "finished" and job["files"][0].endswith("reg-0005.png")
    assert [c["size"] for c in txt2img.calls] == [(832, 1024)]


@pytest.mark.parametrize("field, value", [
    ("count", "0"), ("count", "-1"), ("count", "1.5"), ("count", "1e999"), ("steps", "0"), ("steps", "151"),
    ("seed", "-1"), ("seed", "NaN"), ("width", "100"), ("height", "4096"),
])
def test_numbers_out_of_range_are_422_and_nothing_queues(a1111, client, project, txt2img, field, value):
    before = queued_jobs()
    answer = client.post(f"{V1}/projects/kat/reg-images", content=f'{{"{field}": {value}}}',
                         headers={"content-type": "application/json"})
    assert answer.status_code == 422 and any(field in entry["loc"] for entry in answer.json()["detail"]), answer.text
    assert queued_jobs() == before and reg_files(a1111) == [] and lock_is_free(a1111)


def test_an_unknown_project_and_an_empty_dataset_are_refused_before_anything_queues(a1111, client, project, txt2img):
    before = queued_jobs()
    answer = client.post(f"{V1}/projects/ghost/reg-images", json={})
    assert answer.status_code == 404 and "no project 'ghost'" in answer.json()["detail"]
    assert client.post(f"{V1}/projects/..%2Fkat/reg-images", json={}).status_code in (400, 404)
    empty = create_project(a1111.projects, "empty")
    answer = client.post(f"{V1}/projects/empty/reg-images", json={})
    assert answer.status_code == 400 and "has no images" in answer.json()["detail"]
    assert queued_jobs() == before and not empty.reg.exists() and txt2img.calls == []


def test_a_second_writer_is_refused_with_409_while_the_images_are_drawn(a1111, client, project, txt2img):
    with ProjectLock(a1111.projects / "kat", "training (CLI)"):
        answer = client.post(f"{V1}/projects/kat/reg-images", json={})
        assert answer.status_code == 409 and "busy: training (CLI)" in answer.json()["detail"]
    txt2img.hold = 1
    job_id = client.post(f"{V1}/projects/kat/reg-images", json={"count": 2}).json()["job_id"]
    assert txt2img.holding.wait(10)
    for route, body in (("reg-images", {}), ("train", {"config": {}}), ("undo", {})):
        answer = client.post(f"{V1}/projects/kat/{route}", json=body)
        assert answer.status_code == 409, (route, answer.text)
        assert "busy: drawing regularisation images (HTTP API)" in answer.json()["detail"]
    txt2img.release.set()
    assert wait_for(job_id)["status"] == "finished" and len(txt2img.calls) == 2
    assert lock_is_free(a1111)


def test_interrupt_keeps_the_finished_pairs_and_frees_the_project(a1111, client, project, txt2img):
    txt2img.hold = 2
    job_id = client.post(f"{V1}/projects/kat/reg-images", json={"count": 3}).json()["job_id"]
    assert txt2img.holding.wait(10)
    running = client.get(f"{V1}/jobs/{job_id}").json()
    assert (running["status"], running["phase"], running["step"], running["total_steps"]) == ("running", "drawing", 1, 3)
    assert a1111.shared.state.textinfo == "regularisation image 2/3"
    assert client.post(f"{V1}/jobs/{job_id}/interrupt").json() == {"interrupted": True}
    job = wait_for(job_id)
    # The second image, cut short, is discarded: only complete pairs stay.
    assert job["status"] == "interrupted" and job["message"].startswith("stopped: wrote 1 of 3"), job
    assert reg_files(a1111) == ["reg-0001.png", "reg-0001.txt"] and job["files"][0].endswith("reg-0001.png")
    assert lock_is_free(a1111) and a1111.shared.state.interrupted is False


def test_a_job_cancelled_while_queued_draws_nothing_and_lets_go_of_the_project(a1111, client, project, txt2img):
    with sys.modules["modules.call_queue"].queue_lock:  # a generation holds A1111's queue
        job_id = client.post(f"{V1}/projects/kat/reg-images", json={}).json()["job_id"]
        assert client.post(f"{V1}/jobs/{job_id}/interrupt").json() == {"interrupted": True}
    job = wait_for(job_id)
    assert (job["status"], job["message"]) == ("interrupted", "cancelled before it started")
    assert txt2img.calls == [] and reg_files(a1111) == []
    deadline = time.monotonic() + 10
    while (a1111.projects / "kat" / ".lorakit.lock").exists():  # on_end runs after the status is set
        assert time.monotonic() < deadline
        time.sleep(0.01)
