"""LoRA Kit inside a real A1111: through the HTTP API (dataset → training → files A1111 loads),
then in-process for what HTTP cannot show (the Lora loader check's negative control, un-merging,
the Train button's path under ``wrap_gradio_gpu_call``). See conftest.py for how to run them.

The HTTP tests run in file order and share one trained project.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

TRIGGER = "lkt0k"
PROMPT = "a photo of a cat"
TINY = {"resolution": 64, "enable_bucket": False, "train_batch_size": 2, "num_repeats": 1, "max_train_epochs": 2,
        "network_dim": 4, "network_alpha": 4, "optimizer": "AdamW", "lr_scheduler": "constant", "mixed_precision": "no"}


@pytest.fixture(scope="module")
def project(a1111, new_log_lines, small_grids):
    return a1111.new_project("it", PROMPT)


@pytest.fixture(scope="module")
def baseline(a1111, project):
    """The base model's image for the fixed seed, before any training."""
    return a1111.txt2img(PROMPT)


@pytest.fixture(scope="module")
def lowvram(a1111) -> bool:
    return bool(a1111.call("GET", "/sdapi/v1/cmd-flags").get("lowvram"))


def test_lowvram_is_refused_with_a_reason(a1111, project, lowvram):
    if not lowvram:
        pytest.skip("the WebUI runs without --lowvram")
    job_id = a1111.lorakit("POST", f"/projects/{project}/train", json={"config": TINY}, expect=202)["job_id"]
    job = a1111.wait(job_id)
    assert job["status"] == "failed" and "--lowvram" in job["error"]


@pytest.fixture(scope="module")
def trained(a1111, project, baseline, lowvram):
    if lowvram:
        pytest.skip("--lowvram: LoRA Kit refuses to train (test_lowvram_is_refused_with_a_reason)")
    tags = a1111.lorakit("POST", f"/projects/{project}/tags", json={"trigger": [TRIGGER]})
    assert tags["summary"]["changed"] == 4
    config = {**TINY, "output_name": project, "trigger": TRIGGER}
    plan = a1111.lorakit("POST", f"/projects/{project}/plan", json={"config": config})
    assert plan["total_steps"] == 4
    job_id = a1111.lorakit("POST", f"/projects/{project}/train", json={"config": config}, expect=202)["job_id"]
    job = a1111.wait(job_id)
    assert job["status"] == "finished", job
    return job


def test_the_two_epochs_land_in_the_lora_folder_and_a1111_lists_them(a1111, project, trained):
    names = [f"{project}-01", f"{project}-02"]
    assert [path.rsplit("/", 1)[-1] for path in trained["files"]] == [f"{n}.safetensors" for n in names]
    assert (trained["epoch"], trained["step"], len(trained["losses"])) == (2, 4, 4)
    listed = {lora["name"]: lora for lora in a1111.call("GET", "/sdapi/v1/loras")}
    for name, path in zip(names, trained["files"]):
        assert listed[name]["path"] == path and listed[name]["metadata"]["ss_output_name"] == name


def test_the_model_is_unchanged_and_an_epoch_changes_the_output(a1111, trained, project, baseline):
    assert a1111.txt2img(PROMPT) == baseline
    with_lora = a1111.txt2img(f"{PROMPT} <lora:{project}-01:1>")
    assert with_lora != baseline
    # The Lora extension keeps the LoRA merged after that generation; the next training must undo it.
    assert a1111.txt2img(PROMPT) == baseline


def test_the_grid_after_training_and_on_demand(a1111, project, trained):
    assert trained["grid"] and "failed" not in trained["message"], trained["message"]
    # The grid after training measures each epoch from A1111's own cells and suggests one (or says why not).
    run_id = trained["run_dir"].rsplit("/", 1)[-1]
    report = a1111.lorakit("GET", f"/projects/{project}/runs/{run_id}/epochs")
    assert report["grid_measured"] is True and [row["epoch"] for row in report["epochs"]] == [1, 2]
    assert all(row["validation_loss"] is not None and row["effect"] >= 0 for row in report["epochs"])
    assert trained["suggestion"]["reason"] == report["suggestion"]["reason"] and "suggest" in report["suggestion"]["reason"]
    assert a1111.lorakit("GET", f"/projects/{project}/runs/no-such-run/epochs", expect=400)["detail"].startswith("no run")
    names = [f"{project}-02"]
    job_id = a1111.lorakit("POST", f"/projects/{project}/grid", json={"lora_names": names, "seeds": [7]}, expect=202)["job_id"]
    job = a1111.wait(job_id)
    assert job["status"] == "finished" and job["grid"] and job["kind"] == "grid", job
    job_id = a1111.lorakit("POST", f"/projects/{project}/grid", json={"lora_names": ["no-such-lora"]}, expect=202)["job_id"]
    assert "no-such-lora" in a1111.wait(job_id)["error"]


def test_a_generation_sent_during_training_waits_and_then_succeeds(a1111, project, baseline, trained):
    a1111.call("POST", "/sdapi/v1/options", json={"lorakit_auto_grid": False})
    config = {**TINY, "output_name": f"{project}w", "num_repeats": 20}
    job_id = a1111.lorakit("POST", f"/projects/{project}/train", json={"config": config}, expect=202)["job_id"]
    a1111.wait(job_id, until=lambda job: job["phase"] == "training" or job["status"] != "running")
    result = {}

    def generate():
        result["image"] = a1111.txt2img(PROMPT)
        result["job"] = a1111.job(job_id)

    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive(), "txt2img returned while the training job held the queue"
    thread.join(600)
    assert result["job"]["status"] == "finished", result["job"]
    assert result["image"] == baseline


def test_interrupt_stops_within_a_step_and_a1111_keeps_generating(a1111, project, baseline, trained):
    config = {**TINY, "output_name": f"{project}i", "num_repeats": 200}
    job_id = a1111.lorakit("POST", f"/projects/{project}/train", json={"config": config}, expect=202)["job_id"]
    a1111.wait(job_id, until=lambda job: job["step"] >= 2 or job["status"] != "running")
    assert a1111.lorakit("POST", f"/jobs/{job_id}/interrupt") == {"interrupted": True}
    seen = a1111.job(job_id)["step"]
    job = a1111.wait(job_id, timeout=60)
    assert job["status"] == "interrupted" and job["step"] <= seen + 1, job
    assert a1111.lorakit("POST", f"/jobs/{job_id}/interrupt") == {"interrupted": False}
    assert a1111.txt2img(PROMPT) == baseline
    assert a1111.call("GET", "/sdapi/v1/progress")["state"]["interrupted"] is False


def test_a_busy_project_is_409_a_new_run_never_replaces_and_resume_continues(a1111, project, trained):
    a1111.call("POST", "/sdapi/v1/options", json={"lorakit_auto_grid": False})
    config = {**TINY, "num_repeats": 20}
    first = a1111.lorakit("POST", f"/projects/{project}/train", json={"config": config}, expect=202)["job_id"]
    busy = a1111.lorakit("POST", f"/projects/{project}/train", json={"config": config}, expect=409)
    assert "busy: training (A1111, HTTP API)" in busy["detail"]
    a1111.wait(first, until=lambda job: job["step"] >= 2 or job["status"] != "running")
    a1111.lorakit("POST", f"/jobs/{first}/interrupt")
    stopped = a1111.wait(first, timeout=60)
    assert stopped["status"] == "interrupted", stopped
    run_id = stopped["run_dir"].rsplit("/", 1)[-1]
    (run,) = [r for r in a1111.lorakit("GET", f"/projects/{project}/runs")["runs"] if r["run"] == run_id]
    assert run["output_name"] == f"{project}-v2" and run["resumable"], run
    resumed = a1111.wait(a1111.lorakit("POST", f"/projects/{project}/runs/{run_id}/resume", json={}, expect=202)["job_id"])
    assert resumed["status"] == "finished", resumed
    assert [p.rsplit("/", 1)[-1] for p in resumed["files"]] == [f"{project}-v2-01.safetensors", f"{project}-v2-02.safetensors"]
    listed = {lora["name"]: lora["path"] for lora in a1111.call("GET", "/sdapi/v1/loras")}
    assert all(listed[f"{project}-0{i}"] == path for i, path in ((1, trained["files"][0]), (2, trained["files"][1])))
    detail = a1111.lorakit("POST", f"/projects/{project}/runs/{run_id}/resume", json={}, expect=400)["detail"]
    assert "nothing to resume" in detail


def test_promote_the_best_epoch(a1111, project, trained):
    body = {"epoch_file": f"{project}-02.safetensors", "trigger": TRIGGER, "job_id": trained["id"]}
    promoted = a1111.lorakit("POST", f"/projects/{project}/promote", json=body)
    assert promoted["path"].endswith(f"{project}-gen0.safetensors") and promoted["preview_path"], promoted
    assert {lora["name"] for lora in a1111.call("GET", "/sdapi/v1/loras")} >= {f"{project}-gen0"}
    assert a1111.txt2img(f"{PROMPT} <lora:{project}-gen0:1>") == a1111.txt2img(f"{PROMPT} <lora:{project}-02:1>")


def test_bad_requests_get_4xx(a1111, project):
    flags = a1111.call("GET", "/sdapi/v1/cmd-flags")
    exposed = any(flags.get(k) for k in ("share", "listen", "ngrok", "server_name"))
    outside = a1111.lorakit("POST", f"/projects/{project}/import/folder", json={"folder": "/"}, expect=(200, 400, 403))
    if exposed and not flags.get("enable_insecure_extension_access"):
        assert "refusing to import images from" in outside["detail"]
    assert "no project" in a1111.lorakit("GET", "/projects/no-such-project", expect=404)["detail"]
    a1111.lorakit("POST", f"/projects/{project}/train", json={"config": {"resolution": 7}}, expect=400)
    a1111.lorakit("GET", "/jobs/no-such-job", expect=404)


def test_a1111s_lora_loader_matched_every_key(new_log_lines):
    new = new_log_lines()
    if new is None:
        pytest.skip("no A1111 log to read (set LORAKIT_A1111_LOG)")
    for bad in ("didn't match keys", "Lora not found", "Failed to load network", "Couldn't find network"):
        assert bad not in new


# ---- in-process: A1111's own objects ------------------------------------------------------------
def test_the_post_save_check_uses_a1111s_loader_and_catches_what_it_skips(webui):
    from safetensors.torch import save_file

    from lorakit_ext.export.writer import read_lora_file
    from lorakit_ext.webui import bridge

    good = webui.write_lora("lkcheck-01", 1)
    tensors, metadata = read_lora_file(good)
    modules = sorted({key.split(".")[0] for key in tensors})
    assert bridge.check_lora_file(good) == len(modules)
    name = modules[0]
    bogus = {**tensors, **{f"lora_unet_bogus_block.{part}": tensors[f"{name}.{part}"].clone() for part in ("lora_down.weight", "lora_up.weight", "alpha")}}
    misfit = {**tensors, f"{name}.lora_down.weight": tensors[f"{name}.lora_down.weight"][:, :-1].contiguous()}
    for label, data, match in (("bogus", bogus, r"1 of \d+ modules match no layer \(lora_unet_bogus_block\)"),
                               ("misfit", misfit, rf"1 do not fit their layer \({name}\)")):
        path = webui.lora_dir / f"lkcheck-{label}.safetensors"
        save_file(data, str(path), metadata=metadata)
        try:
            with pytest.raises(bridge.LoraFileRejected, match=match):
                bridge.check_lora_file(path)
        finally:
            path.unlink()


def test_training_starts_from_the_weights_without_a_merged_lora(webui):
    from lorakit_ext.webui import bridge

    sd_model = webui.shared.sd_model
    webui.write_lora("lkmerge-01", 2)
    bridge.unmerge_networks(sd_model)  # whatever earlier tests in this process left merged
    before, image = bridge.fingerprint(sd_model), webui.txt2img(PROMPT, seed=3)
    assert webui.txt2img(f"{PROMPT} <lora:lkmerge-01:1>", seed=3).tobytes() != image.tobytes()
    assert before.changes(bridge.fingerprint(sd_model)), "A1111 keeps a LoRA merged after a generation"
    assert bridge.unmerge_networks(sd_model) > 0
    assert before.changes(bridge.fingerprint(sd_model)) == []
    assert webui.txt2img(PROMPT, seed=3).tobytes() == image.tobytes()


def test_the_train_button_path_under_wrap_gradio_gpu_call(webui):
    from modules.call_queue import wrap_gradio_gpu_call

    from lorakit_ext.project import create_project
    from lorakit_ext.webui import bridge, host, jobs

    shared, name = webui.shared, f"lkbutton{int(time.time())}"
    project = create_project(host.projects_root(), name)
    for i in range(4):
        webui.txt2img(f"{PROMPT} {i}", seed=10 + i).save(project.dataset / f"cat{i}.png")
        (project.dataset / f"cat{i}.txt").write_text(f"{TRIGGER}, cat {i}")
    auto_grid = shared.opts.data.get("lorakit_auto_grid", True)
    shared.opts.data["lorakit_auto_grid"] = False
    handler = wrap_gradio_gpu_call(jobs.train_in_gradio, extra_outputs=[[], [], None])
    before = bridge.fingerprint(shared.sd_model)
    try:
        losses, files, grid, status = handler("task(lkbutton)", name, json.dumps({**TINY, "trigger": TRIGGER}))
        shared.cmd_opts.lowvram = True
        *_, refused = handler("task(lkbutton-lowvram)", name, json.dumps(TINY))
    finally:
        shared.cmd_opts.lowvram = False
        shared.opts.data["lorakit_auto_grid"] = auto_grid
    assert [f.rsplit("/", 1)[-1] for f in files] == [f"{name}-01.safetensors", f"{name}-02.safetensors"]
    assert len(losses) == 4 and grid is None and "Finished" in status and "Time taken" in status
    assert jobs.job_status("task(lkbutton)")["status"] == "finished"
    assert "--lowvram" in refused and jobs.job_status("task(lkbutton-lowvram)")["status"] == "failed"
    assert before.changes(bridge.fingerprint(shared.sd_model)) == []
    assert (shared.state.job_count, shared.state.interrupted) == (0, False)
