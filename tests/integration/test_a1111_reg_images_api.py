"""Regularisation images over HTTP (``POST /lorakit/v1/projects/{name}/reg-images``) inside a real
A1111: drawn by its txt2img on the loaded model as a background job that the job routes follow and
interrupt, into the project's ``reg/`` on the server, with the project's lock held meanwhile. Skipped
without ``LORAKIT_A1111_URL`` (see conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

TRIGGER = "itregk"
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def project(a1111) -> str:
    """Two images A1111 drew, captioned with the trigger first."""
    name = a1111.new_project("itreg", PROMPT, count=2)
    images = sorted(a1111.lorakit("GET", f"/projects/{name}/captions")["captions"])
    captions = {image: f"{TRIGGER}, a cat, number {i}" for i, image in enumerate(images)}
    a1111.lorakit("PUT", f"/projects/{name}/captions", json={"captions": captions})
    return name


def reg_folder(a1111, project: str) -> Path:
    return Path(a1111.lorakit("GET", f"/projects/{project}")["path"]) / "reg"


def test_two_images_drawn_through_the_route_and_the_job_polled_until_done(a1111, project):
    baseline = a1111.txt2img(PROMPT)
    body = {"trigger": TRIGGER, "count": 2, "steps": 2, "seed": 42, "width": 64, "height": 64}
    job_id = a1111.lorakit("POST", f"/projects/{project}/reg-images", json=body, expect=202)["job_id"]
    job = a1111.wait(job_id)
    assert (job["status"], job["kind"], job["step"], job["total_steps"]) == ("finished", "reg-images", 2, 2), job
    assert "wrote 2 of 2 regularisation images" in job["message"], job["message"]
    reg = reg_folder(a1111, project)
    assert job["files"] == [str(reg / "reg-0001.png"), str(reg / "reg-0002.png")]
    assert sorted(p.name for p in reg.iterdir()) == ["reg-0001.png", "reg-0001.txt", "reg-0002.png", "reg-0002.txt"]
    # The captions without the trigger were the prompts, and are the images' captions.
    assert [(reg / f"reg-000{n}.txt").read_text(encoding="utf-8") for n in (1, 2)] == ["a cat, number 0", "a cat, number 1"]
    assert all(Image.open(reg / f"reg-000{n}.png").size == (64, 64) for n in (1, 2))
    # Drawn on the loaded model as it is: it generates exactly as before.
    assert a1111.txt2img(PROMPT) == baseline


def test_a_second_writer_gets_409_and_interrupt_keeps_the_finished_pairs(a1111, project):
    reg = reg_folder(a1111, project)
    before = {p.name for p in reg.iterdir()} if reg.is_dir() else set()
    body = {"trigger": TRIGGER, "count": 200, "steps": 4, "width": 64, "height": 64}
    job_id = a1111.lorakit("POST", f"/projects/{project}/reg-images", json=body, expect=202)["job_id"]
    a1111.wait(job_id, until=lambda job: job["step"] >= 1 or job["status"] != "running")
    for route, second in (("reg-images", body), ("train", {"config": {}})):
        detail = a1111.lorakit("POST", f"/projects/{project}/{route}", json=second, expect=409)["detail"]
        assert "busy: drawing regularisation images (HTTP API)" in detail, detail
    assert a1111.lorakit("POST", f"/jobs/{job_id}/interrupt") == {"interrupted": True}
    job = a1111.wait(job_id)
    assert job["status"] == "interrupted" and job["message"].startswith("stopped: wrote"), job
    written = {p.name for p in reg.iterdir()} - before
    assert 2 <= len(written) < 400 and len(written) == 2 * len(job["files"]), written
    assert all((reg / Path(f).name).is_file() and (reg / Path(f).with_suffix(".txt").name).is_file() for f in job["files"])
    # The project is free again as soon as the job reads as ended.
    again = a1111.lorakit("POST", f"/projects/{project}/reg-images", json={**body, "count": 1}, expect=202)["job_id"]
    assert a1111.wait(again)["status"] == "finished"
