"""A training queued over a real A1111's HTTP API runs headless with ``queue run`` and leaves its
epochs in A1111's Lora folder, where A1111 lists and applies them (see conftest.py for how to run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a photo of a dog"
TINY = {"resolution": 64, "enable_bucket": False, "train_batch_size": 2, "num_repeats": 1, "max_train_epochs": 1,
        "network_dim": 4, "network_alpha": 4, "optimizer": "AdamW", "lr_scheduler": "constant", "unet_lr": 1e-2}


def test_a_run_queued_over_http_trains_headless_into_the_lora_folder(a1111, new_log_lines):
    project = a1111.new_project("itq", PROMPT)
    root = a1111.lorakit("GET", "/projects")["root"]
    refused = a1111.lorakit("POST", f"/projects/{project}/queue", json={"config": {"network_dim": 0}}, expect=400)
    assert "network_dim" in refused["detail"]
    entry = a1111.lorakit("POST", f"/projects/{project}/queue", json={"config": {**TINY, "output_name": project}}, expect=201)["entry"]
    assert entry["id"] in [e["id"] for e in a1111.lorakit("GET", "/queue")["entries"]]
    # Entries other tests left queued must not run here.
    for other in a1111.lorakit("GET", "/queue")["entries"]:
        if other["status"] == "queued" and other["id"] != entry["id"]:
            a1111.lorakit("POST", f"/queue/{other['id']}/cancel")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "lorakit_ext", "queue", "run", "--root", root, "--cpu", "1", "--json"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    ran = {e["id"]: e for e in json.loads(done.stdout)["entries"]}
    result = ran[entry["id"]]["result"]
    assert ran[entry["id"]]["status"] == "finished" and len(result["files"]) == 1

    a1111.call("POST", "/sdapi/v1/refresh-loras")
    listed = {lora["name"]: lora for lora in a1111.call("GET", "/sdapi/v1/loras")}
    assert listed[f"{project}-01"]["path"] == result["files"][0]
    baseline = a1111.txt2img(PROMPT)
    assert a1111.txt2img(f"{PROMPT} <lora:{project}-01:1>") != baseline
    log = new_log_lines()
    assert log is None or "didn't match keys" not in log
