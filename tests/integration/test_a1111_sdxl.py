"""A real A1111 with an SDXL checkpoint loaded (the harness's tiny-sdxl: start it with
``A1111H_CKPT=tiny-sdxl.safetensors start_a1111.sh``); skipped when the loaded model is not SDXL.

SDXL training is not available yet: a request is refused with that reason, nothing is written,
and the model keeps generating exactly as before.
"""

from __future__ import annotations

import time

import pytest

PROMPT = "a red square"


@pytest.fixture(scope="module")
def sdxl(a1111):
    loaded = a1111.call("GET", "/sdapi/v1/options")["sd_model_checkpoint"]
    if "xl" not in loaded.lower():
        pytest.skip(f"the loaded checkpoint is {loaded!r}, not SDXL; start the harness with A1111H_CKPT=tiny-sdxl.safetensors")
    return a1111


def test_training_an_sdxl_model_is_refused_with_the_reason_and_writes_nothing(sdxl):
    project = f"itxl{int(time.time())}"
    sdxl.lorakit("POST", "/projects", json={"name": project})
    files = [("files", (f"{i}.png", sdxl.png(f"{PROMPT} {i}", seed=10 + i), "image/png")) for i in range(2)]
    assert len(sdxl.lorakit("POST", f"/projects/{project}/import/upload", files=files)["imported"]) == 2
    before = sdxl.txt2img(PROMPT)
    config = {"resolution": 64, "enable_bucket": False, "train_batch_size": 1, "num_repeats": 1, "max_train_epochs": 1}
    job = sdxl.wait(sdxl.lorakit("POST", f"/projects/{project}/train", json={"config": config}, expect=202)["job_id"])
    assert job["status"] == "failed" and "SDXL training is not available" in job["error"], job
    assert job["files"] == [] and job["run_dir"] is None
    assert sdxl.lorakit("GET", f"/projects/{project}/runs")["runs"] == []
    assert sdxl.txt2img(PROMPT) == before
