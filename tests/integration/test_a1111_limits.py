"""What LoRA Kit refuses inside a real A1111, and what A1111's progress bar shows while it works:
symlinks in the projects root that lead out of it, numbers out of their limits (4xx at request
time, nothing queued), a clip_skip deeper than the text encoder, and the progress text through
training, saving and the grid. Over HTTP first, then in-process (see conftest.py for both).
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

TINY = {"resolution": 64, "enable_bucket": False, "train_batch_size": 2, "num_repeats": 1, "max_train_epochs": 2,
        "network_dim": 4, "network_alpha": 4, "optimizer": "AdamW", "lr_scheduler": "constant", "mixed_precision": "no"}
# The harness's tiny text encoder has 4 layers.
TE_DEPTH = 4
GRID_CELL = re.compile(r"^epoch grid · cell (\d+)/(\d+)$")


@pytest.fixture(scope="module")
def project(a1111, new_log_lines, small_grids):
    name = f"itlim{int(time.time())}"
    a1111.lorakit("POST", "/projects", json={"name": name})
    files = [("files", (f"cat {i}.png", a1111.png(f"a photo of a cat {i}", seed=200 + i), "image/png")) for i in range(2)]
    assert len(a1111.lorakit("POST", f"/projects/{name}/import/upload", files=files)["imported"]) == 2
    return name


def latest_job(a1111):
    answer = a1111.http.get(a1111.url + "/lorakit/v1/jobs/latest", timeout=60)
    return answer.json()["id"] if answer.status_code == 200 else None


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---- symlinks in the projects root ------------------------------------------------------------
@pytest.fixture
def links(a1111, project, tmp_path):
    """In the server's projects root: a project folder and a project's dataset that are symlinks
    to folders outside it, and a dataset image that is a symlink to a file outside it."""
    root = Path(a1111.lorakit("GET", "/projects")["root"])
    outside = tmp_path / "outside"
    (outside / "away" / "dataset").mkdir(parents=True)
    (outside / "photos").mkdir()
    shutil.copy(root / project / "dataset" / "cat 0.png", outside / "secret.png")
    stamp = int(time.time())
    made = [root / f"itlinked{stamp}", root / f"itlinkds{stamp}" / "dataset", root / project / "dataset" / "secret.png"]
    made[0].symlink_to(outside / "away", target_is_directory=True)
    made[1].parent.mkdir()
    made[1].symlink_to(outside / "photos", target_is_directory=True)
    made[2].symlink_to(outside / "secret.png")
    yield made[0].name, made[1].parent.name, outside
    for link in made:
        link.unlink()
    made[1].parent.rmdir()


def test_symlinks_leading_out_of_the_projects_root_are_not_followed(a1111, project, links):
    linked, linked_dataset, outside = links
    before = tree(outside)
    listed = a1111.lorakit("GET", "/projects")["projects"]
    assert project in listed and linked not in listed and linked_dataset not in listed
    for name in (linked, linked_dataset):
        assert "symbolic link" in a1111.lorakit("GET", f"/projects/{name}", expect=400)["detail"]
    files = [("files", ("in.png", a1111.png("a photo of a dog"), "image/png"))]
    a1111.lorakit("POST", f"/projects/{linked}/import/upload", files=files, expect=400)
    a1111.lorakit("PUT", f"/projects/{linked}/captions", json={"captions": {"in.png": "x"}}, expect=400)
    detail = a1111.lorakit("PUT", f"/projects/{project}/captions", json={"captions": {"secret.png": "x"}}, expect=400)["detail"]
    assert "symbolic link" in detail and "secret.png" in detail
    assert tree(outside) == before


# ---- numbers out of their limits --------------------------------------------------------------
def post_raw(a1111, path: str, body: str):
    """``body`` as it is: 1e999, NaN and Infinity are what a careless client sends."""
    return a1111.http.post(a1111.url + "/lorakit/v1" + path, data=body, headers={"content-type": "application/json"}, timeout=60)


def names_field(answer, field: str) -> bool:
    return answer.status_code == 422 and any(field in entry["loc"] for entry in answer.json()["detail"])


def test_import_with_an_overflowing_megapixel_limit_is_422_not_500(a1111, project):
    # A folder LoRA Kit may read also where A1111 disabled extension access (the harness does).
    folder = Path(a1111.lorakit("GET", f"/projects/{project}")["removed"])
    for value in ("1e999", "NaN", "-Infinity", "0"):
        answer = post_raw(a1111, f"/projects/{project}/import/folder", f'{{"folder": "{folder}", "max_megapixels": {value}}}')
        assert names_field(answer, "max_megapixels"), answer.text


def test_grid_values_out_of_the_tabs_limits_are_refused_before_anything_queues(a1111, project):
    latest = latest_job(a1111)
    path = f"/projects/{project}/grid"
    for field, value in (("steps", "1000"), ("steps", "1e999"), ("width", "100"), ("height", "4096"),
                         ("cfg_scale", "NaN"), ("seeds", "[-1]"), ("seeds", "[4294967296]"), ("weights", "[Infinity]")):
        answer = post_raw(a1111, path, f'{{"lora_names": ["{project}-01"], "{field}": {value}}}')
        assert names_field(answer, field), (field, value, answer.text)
    detail = a1111.lorakit("POST", path, json={"lora_names": [f"{project}-01"], "seeds": [3, 3]}, expect=400)["detail"]
    assert "listed twice" in detail
    assert latest_job(a1111) == latest


# ---- clip_skip deeper than the text encoder ---------------------------------------------------
def test_a_clip_skip_deeper_than_the_text_encoder_fails_with_its_range(a1111, project):
    """12 is SD1.5's depth and the form's maximum; past depth + 1 it was an IndexError at the first step."""
    if "xl" in a1111.loaded_checkpoint().lower():
        pytest.skip("SDXL conditions on fixed text-encoder layers and has no clip_skip (as kohya's sdxl_train_network)")
    config = {**TINY, "output_name": f"{project}cs", "clip_skip": 12}
    job = a1111.wait(a1111.lorakit("POST", f"/projects/{project}/train", json={"config": config}, expect=202)["job_id"])
    assert job["status"] == "failed" and job["step"] == 0 and job["files"] == [], job
    assert "clip_skip 12" in job["error"] and f"from 1 to {TE_DEPTH}" in job["error"], job["error"]
    assert "IndexError" not in job["error"]


# ---- the progress text ------------------------------------------------------------------------
def test_the_progress_text_follows_training_and_the_grid_with_one_eta(a1111, project):
    """What A1111's progress API (the bar's source) says while a run trains and draws its grid."""
    a1111.call("POST", "/sdapi/v1/options", json={"lorakit_auto_grid": True})
    texts, done = [], threading.Event()

    def watch():
        while not done.is_set():
            text = a1111.call("GET", "/sdapi/v1/progress?skip_current_image=true")["textinfo"]
            if text and (not texts or texts[-1] != text):
                texts.append(text)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        config = {**TINY, "output_name": f"{project}pr", "trigger": "lkt0k"}
        job = a1111.wait(a1111.lorakit("POST", f"/projects/{project}/train", json={"config": config}, expect=202)["job_id"])
    finally:
        done.set()
        watcher.join()
    assert job["status"] == "finished" and job["grid"], job
    assert not [t for t in texts if "ETA" in t], texts
    assert any(re.match(r"epoch 2/2 · step 2/2 · saving$", t) for t in texts), texts
    cells = [GRID_CELL.match(t) for t in texts if GRID_CELL.match(t)]
    # The no-LoRA column and two epochs at the settings' two seeds.
    assert cells and {int(m.group(2)) for m in cells} == {6}, texts
    assert texts.index(cells[0].group(0)) > max(i for i, t in enumerate(texts) if t.startswith("epoch 2/2")), texts


# ---- in-process: A1111's own objects ------------------------------------------------------------
def test_the_model_adapter_refuses_a_clip_skip_deeper_than_a1111s_text_encoder(webui):
    from lorakit_ext.errors import UserError
    from lorakit_ext.train_config import TrainConfig
    from lorakit_ext.webui import bridge

    sd_model = webui.shared.sd_model
    image = webui.txt2img("a photo of a cat", seed=5)
    before = bridge.fingerprint(sd_model)
    with pytest.raises(UserError, match=rf"clip_skip {TE_DEPTH + 1} .* {TE_DEPTH} layers; use a clip_skip from 1 to {TE_DEPTH}"):
        with bridge.training_model(TrainConfig(clip_skip=TE_DEPTH + 1)):
            pytest.fail("no training may start")
    with bridge.training_model(TrainConfig(clip_skip=TE_DEPTH)) as model:
        assert model.clip_skip == TE_DEPTH
    assert before.changes(bridge.fingerprint(sd_model)) == []
    assert webui.txt2img("a photo of a cat", seed=5).tobytes() == image.tobytes()


@pytest.fixture
def textinfo_log(webui, monkeypatch):
    """Every text A1111's ``shared.state`` is given, in order: what its progress bar shows."""
    state = webui.shared.state
    log = []

    class Recording(type(state)):
        def __setattr__(self, name, value):
            super().__setattr__(name, value)
            if name == "textinfo" and value:
                log.append(value)

    monkeypatch.setattr(state, "__class__", Recording)
    return log


def test_the_progress_text_names_each_phase_and_each_grid_cell(webui, textinfo_log, monkeypatch):
    from modules.call_queue import wrap_gradio_gpu_call

    from lorakit_ext.project import create_project
    from lorakit_ext.webui import host, jobs

    name = f"lkprogress{int(time.time())}"
    project = create_project(host.projects_root(), name)
    for i in range(2):
        webui.txt2img(f"a photo of a cat {i}", seed=20 + i).save(project.dataset / f"cat{i}.png")
    for key, value in (("lorakit_auto_grid", True), ("lorakit_grid_size", 64), ("lorakit_grid_steps", 2),
                       ("lorakit_grid_seeds", "1,2")):
        monkeypatch.setitem(webui.shared.opts.data, key, value)
    handler = wrap_gradio_gpu_call(jobs.train_in_gradio, extra_outputs=[[], [], None])
    *_, grid, status = handler("task(lkprogress)", name, json.dumps(TINY))
    assert grid and "Finished" in status, status
    texts = textinfo_log
    training = [i for i, t in enumerate(texts) if re.match(r"epoch [12]/2 · step [1-2]/2 · loss", t)]
    saving = [i for i, t in enumerate(texts) if t.endswith("· saving")]
    assert training and len(saving) == 2 and not [t for t in texts if "ETA" in t], texts
    assert texts[saving[-1] + 1:] == ["epoch grid · 6 cells"] + [f"epoch grid · cell {n}/6" for n in range(1, 7)], texts


def test_symlinked_projects_are_not_offered_or_opened_by_the_tab(webui, tmp_path):
    from lorakit_ext.errors import UserError
    from lorakit_ext.project import create_project
    from lorakit_ext.webui import host, ui_shared

    root = host.projects_root()
    away = create_project(tmp_path / "outside", "away")
    link = root / f"lklinked{int(time.time())}"
    link.symlink_to(away.path, target_is_directory=True)
    try:
        assert link.name not in ui_shared.project_names()
        with pytest.raises(UserError, match="symbolic link"):
            ui_shared.current_project(link.name)
    finally:
        link.unlink()
    assert tree(tmp_path / "outside") == ["away", "away/_removed", "away/dataset", "away/runs"]
