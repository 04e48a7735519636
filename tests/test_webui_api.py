"""The HTTP API's refusals with A1111's ``modules`` stood in for (see test_webui_unit.py): symlinks
in the projects root that lead out of it, and numbers out of their limits, refused with a 4xx
and a detail before anything is written or queued."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from test_webui_unit import a1111, client, project, wait_for  # noqa: F401 - the stand-ins are fixtures there

from lorakit_ext.project import create_project

V1 = "/lorakit/v1"


def png(path: Path) -> Path:
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return path


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---- symlinks in the projects root ------------------------------------------------------------
@pytest.fixture
def outside(tmp_path) -> Path:
    """A project and a picture outside the projects root, which LoRA Kit must never touch."""
    create_project(tmp_path / "outside", "away")
    png(tmp_path / "outside" / "secret.png")
    return tmp_path / "outside"


def test_a_project_folder_linked_out_of_the_root_is_not_followed(a1111, client, project, outside):
    a1111.shared.cmd_opts.disable_extension_access = True
    (a1111.projects / "linked").symlink_to(outside / "away", target_is_directory=True)
    before = tree(outside)
    assert client.get(f"{V1}/projects").json()["projects"] == ["kat"]
    answer = client.get(f"{V1}/projects/linked")
    assert answer.status_code == 400 and "symbolic link" in answer.json()["detail"]
    files = [("files", ("a.png", png(a1111.root / "a.png").read_bytes(), "image/png"))]
    assert client.post(f"{V1}/projects/linked/import/upload", files=files).status_code == 400
    body = {"captions": {"secret.png": "x"}}
    assert client.put(f"{V1}/projects/linked/captions", json=body).status_code == 400
    assert client.post(f"{V1}/projects/linked/dedupe", json={"apply": True}).status_code == 400
    assert tree(outside) == before


def test_a_linked_dataset_and_a_linked_image_are_refused(a1111, client, project, outside):
    kat = a1111.projects / "kat"
    (kat / "dataset" / "a.png").symlink_to(outside / "secret.png")
    answer = client.put(f"{V1}/projects/kat/captions", json={"captions": {"a.png": "stolen"}})
    assert answer.status_code == 400 and "symbolic link" in answer.json()["detail"]
    assert client.post(f"{V1}/projects/kat/dedupe", json={}).status_code == 400
    linked = create_project(a1111.projects, "linked")
    linked.dataset.rmdir()
    linked.dataset.symlink_to(outside / "away" / "dataset", target_is_directory=True)
    assert client.get(f"{V1}/projects").json()["projects"] == ["kat"]
    assert client.get(f"{V1}/projects/linked").status_code == 400
    assert tree(outside) == ["away", "away/_removed", "away/dataset", "away/runs", "secret.png"]


# ---- numbers out of their limits --------------------------------------------------------------
def raw_post(client, path: str, body: str):
    """``body`` sent as it is: Python's json module writes no 1e999 and reads NaN/Infinity, as the server does."""
    return client.post(V1 + path, content=body, headers={"content-type": "application/json"})


def names_field(answer, field: str) -> bool:
    """FastAPI's 422 detail: one entry per bad field, its location and a message."""
    return answer.status_code == 422 and any(field in entry["loc"] for entry in answer.json()["detail"])


@pytest.mark.parametrize("value", ["1e999", "-1e999", "NaN", "Infinity", "0", "-1", "1e6"])
def test_import_max_megapixels_out_of_range_is_422(a1111, client, project, tmp_path, value):
    answer = raw_post(client, "/projects/kat/import/folder", f'{{"folder": "{tmp_path}", "max_megapixels": {value}}}')
    assert names_field(answer, "max_megapixels"), answer.text


def test_dedupe_numbers_out_of_range_are_refused(a1111, client, project):
    assert names_field(raw_post(client, "/projects/kat/dedupe", '{"threshold": 1e999}'), "threshold")
    answer = raw_post(client, "/projects/kat/dedupe", '{"threshold": 1000}')
    assert answer.status_code == 400 and "outside 0–63" in answer.json()["detail"]
    assert names_field(raw_post(client, "/projects/kat/dedupe", '{"keep": {"1e999": "a.png"}}'), "keep")


def test_promote_weight_out_of_range_is_422(a1111, client, project):
    for value in ("NaN", "1e999", "2.5", "-0.1"):
        answer = raw_post(client, "/projects/kat/promote", f'{{"epoch_file": "kat-01.safetensors", "preferred_weight": {value}}}')
        assert names_field(answer, "preferred_weight"), answer.text


@pytest.fixture
def grids(a1111, monkeypatch):
    """The grid jobs that reach the renderer, with what they were asked to draw."""
    from lorakit_ext.webui import jobs, xyz

    drawn = []

    def run_epoch_grid(lora_names, **request):
        drawn.append(dict(request, lora_names=lora_names))
        return SimpleNamespace(path=Path("grid.png"), cells={})

    monkeypatch.setattr(xyz, "run_epoch_grid", run_epoch_grid)
    queued_before = set(jobs._jobs)
    return SimpleNamespace(drawn=drawn, queued=lambda: set(jobs._jobs) - queued_before)


@pytest.mark.parametrize(
    "field, value",
    [("steps", "1e999"), ("steps", "0"), ("steps", "151"), ("steps", "NaN"), ("width", "100"), ("width", "4096"),
     ("height", "56"), ("height", "-512"), ("cfg_scale", "Infinity"), ("cfg_scale", "NaN"), ("cfg_scale", "31"),
     ("seeds", "[-1]"), ("seeds", "[4294967296]"), ("seeds", "[1e999]"), ("seeds", "[1.5]"),
     ("weights", "[NaN]"), ("weights", "[1e999]"), ("weights", "[3]")],
)
def test_grid_numbers_out_of_the_tabs_limits_are_422_and_nothing_queues(a1111, client, project, grids, field, value):
    answer = raw_post(client, "/projects/kat/grid", f'{{"lora_names": ["kat-01"], "{field}": {value}}}')
    assert names_field(answer, field), answer.text
    assert not grids.queued()


def test_grid_values_checked_at_request_time_are_400_and_nothing_queues(a1111, client, project, grids):
    """What pydantic cannot see: repeated seeds, a grid over A1111's size limit, and settings that
    POST /sdapi/v1/options stored out of range."""
    answer = client.post(f"{V1}/projects/kat/grid", json={"lora_names": ["kat-01"], "seeds": [1, 1]})
    assert answer.status_code == 400 and "listed twice" in answer.json()["detail"]
    a1111.shared.opts.img_max_size_mp = 1
    answer = client.post(f"{V1}/projects/kat/grid", json={"lora_names": ["kat-01", "kat-02"], "width": 1024, "height": 1024})
    assert answer.status_code == 400 and "Maximum image size" in answer.json()["detail"]
    a1111.shared.opts.img_max_size_mp = 200
    a1111.shared.opts.data["lorakit_grid_size"] = 100
    answer = client.post(f"{V1}/projects/kat/grid", json={"lora_names": ["kat-01"]})
    assert answer.status_code == 400 and "width must be a whole number from 64 to 2048 in steps of 8, not 100" in answer.json()["detail"]
    assert not grids.queued()


def test_a_grid_within_the_limits_queues_with_the_settings_filling_the_rest(a1111, client, project, grids):
    a1111.shared.opts.data.update(lorakit_grid_size=64, lorakit_grid_steps=4)
    answer = client.post(f"{V1}/projects/kat/grid", json={"lora_names": ["kat-01", "kat-02"], "seeds": [0, 4294967295], "height": 2048})
    assert answer.status_code == 202, answer.text
    assert wait_for(answer.json()["job_id"])["status"] == "finished"
    (drawn,) = grids.drawn
    assert (drawn["steps"], drawn["width"], drawn["height"], drawn["seeds"]) == (4, 64, 2048, [0, 4294967295])


def test_the_api_and_the_tab_share_one_definition_of_each_limit():
    from lorakit_ext.webui import api, limits

    schema = json.loads(api.Grid.schema_json())["properties"]
    assert (schema["width"]["minimum"], schema["width"]["maximum"], schema["width"]["multipleOf"]) == (64, 2048, 8)
    assert (limits.GRID_SIZE.minimum, limits.GRID_SIZE.maximum, limits.GRID_SIZE.step) == (64, 2048, 8)
    assert schema["steps"]["maximum"] == limits.GRID_STEPS.maximum and schema["cfg_scale"]["maximum"] == limits.GRID_CFG.maximum
    assert math.isclose(json.loads(api.Promote.schema_json())["properties"]["preferred_weight"]["maximum"], 2.0)


# ---- the run queue ----------------------------------------------------------------------------
def test_a_training_queued_over_http_names_a1111s_checkpoint_and_is_checked_first(a1111, client, project, tiny_sd15_dir, monkeypatch):
    checkpoint = str(tiny_sd15_dir / "tiny-sd15.safetensors")
    known = {"tiny-sd15.safetensors [abc]": SimpleNamespace(filename=checkpoint)}
    sd_models = sys.modules["modules"].sd_models = SimpleNamespace(get_closet_checkpoint_match=known.get, model_data=SimpleNamespace(sd_model=None))
    monkeypatch.setitem(sys.modules, "modules.sd_models", sd_models)
    sys.modules["modules.paths"].script_path = str(a1111.root / "webui")
    assert client.post(f"{V1}/projects/kat/queue", json={"config": {"network_dim": -3}, "checkpoint": "tiny-sd15.safetensors [abc]"}).status_code == 400
    answer = client.post(f"{V1}/projects/kat/queue", json={"checkpoint": "missing"})
    assert answer.status_code == 400 and "knows no checkpoint" in answer.json()["detail"]
    assert client.post(f"{V1}/projects/kat/queue", json={}).status_code == 400  # none loaded, none named
    assert client.get(f"{V1}/queue").json()["entries"] == []

    answer = client.post(f"{V1}/projects/kat/queue", json={"config": {"max_train_epochs": 3}, "checkpoint": "tiny-sd15.safetensors [abc]"})
    assert answer.status_code == 201
    entry = answer.json()["entry"]
    folder = a1111.projects / ".queue" / entry["id"]
    config_at = entry["argv"][entry["argv"].index("--config") + 1]
    assert Path(config_at) == folder / "config.json" and json.loads(Path(config_at).read_text()) == {"max_train_epochs": 3}
    assert entry["argv"][entry["argv"].index("--base-model") + 1] == checkpoint
    assert [e["id"] for e in client.get(f"{V1}/queue").json()["entries"]] == [entry["id"]]
    assert client.post(f"{V1}/queue/{entry['id']}/cancel").json()["entry"]["status"] == "cancelled"
    assert client.post(f"{V1}/queue/{entry['id']}/cancel").status_code == 400
    assert client.post(f"{V1}/queue/..%2F..%2Fkat/cancel").status_code in (400, 404)
