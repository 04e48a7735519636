"""SDXL training inside a real A1111 (v1.10.1 in the harness) on the harness's tiny SDXL
(``make_tiny_sdxl.py``: every real SDXL module name, tiny widths). Two tiers, each skipped without
its variable (see conftest.py):

* HTTP (``LORAKIT_A1111_URL``), A1111 started on the tiny SDXL; skipped when another model is loaded::

    A1111H=/root/a1111h A1111H_CKPT=tiny-sdxl.safetensors /work/shared/a1111-harness/start_a1111.sh

* in-process (``LORAKIT_A1111_DIR``): the module switches the in-process A1111 to
  ``models/Stable-diffusion/tiny-sdxl.safetensors`` and back to the previous checkpoint afterwards.

What a user sees: a job on the loaded SDXL finishes, each epoch is a kohya SDXL LoRA (``lora_unet_``,
``lora_te1_``, ``lora_te2_``, SDXL metadata) that A1111's own Lora loader applies with every key
matched and that changes the image, and the checkpoint generates exactly as before. In-process
also: the weight fingerprint catches a changed SDXL text encoder, and a v-prediction model trains
on velocity and says so in its files.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import pytest

PROMPT = "a photo of a cat"
TRIGGER = "lkxl"
PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_")
ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
# 4 images, batch 2, 2 epochs: 4 steps at 64 px, seconds on a CPU.
TINY = {"resolution": 64, "enable_bucket": False, "train_batch_size": 2, "num_repeats": 1, "max_train_epochs": 2,
        "network_dim": 4, "network_alpha": 4, "optimizer": "AdamW", "lr_scheduler": "constant", "mixed_precision": "no"}
# What A1111's Lora extension logs (DEBUG) or puts in the infotext when a file does not fully apply.
LOADER_COMPLAINTS = ("didn't match keys", "Lora not found", "Failed to load network", "Couldn't find network", "Networks with errors")
# A level-1 transformer has blocks 0..1 only, so this module exists in no SDXL (make_tiny_sdxl.py --lora-bad-key).
BOGUS = "lora_unet_input_blocks_4_1_transformer_blocks_7_attn1_to_q"


def read_lora(path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
    return load_file(str(path)), metadata


def assert_sdxl_lora(path, prediction: str = "epsilon") -> dict:
    """Checks the file is what kohya's sdxl_train_network writes; returns its metadata."""
    tensors, metadata = read_lora(path)
    modules = {key.partition(".")[0] for key in tensors}
    # All three components trained, and nothing outside them (an SD1 "lora_te_" would load nowhere).
    assert all(m.startswith(PREFIXES) for m in modules), sorted(m for m in modules if not m.startswith(PREFIXES))[:5]
    counts = {p: sum(m.startswith(p) for m in modules) for p in PREFIXES}
    # kohya's SDXL "LoRA" targets (the tiny SDXL keeps every module name): the UNet's 722 transformer
    # linears, CLIP-L's 12 × 6 linears and bigG's 32 × 6 (q/k/v/out of its attention, the MLP's 2).
    assert counts["lora_unet_"] == 722 and counts["lora_te1_"] == 72 and counts["lora_te2_"] == 192, (path, counts)
    assert all(f"{m}.{part}" in tensors for m in modules for part in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == ARCHITECTURE
    assert metadata["modelspec.prediction_type"] == prediction
    return metadata


# ---- over HTTP ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl(a1111):
    loaded = a1111.loaded_checkpoint()
    if "xl" not in loaded.lower():
        pytest.skip(f"the loaded checkpoint is {loaded!r}, not SDXL; start the harness with A1111H_CKPT=tiny-sdxl.safetensors")
    return a1111


@pytest.fixture(scope="module")
def project(sdxl, new_log_lines, small_grids):
    name = sdxl.new_project("itxl", PROMPT)
    assert sdxl.lorakit("POST", f"/projects/{name}/tags", json={"trigger": [TRIGGER]})["summary"]["changed"] == 4
    return name


@pytest.fixture(scope="module")
def baseline(sdxl, project) -> bytes:
    """The SDXL checkpoint's image for a fixed seed, taken before any training."""
    return sdxl.txt2img(PROMPT)


@pytest.fixture(scope="module")
def trained(sdxl, project, baseline):
    config = {**TINY, "output_name": project, "trigger": TRIGGER}
    job_id = sdxl.lorakit("POST", f"/projects/{project}/train", json={"config": config}, expect=202)["job_id"]
    job = sdxl.wait(job_id)
    # Each epoch file is checked with A1111's loader before it is reported (a misfit fails the job).
    assert job["status"] == "finished", job
    return job


def generate(server, prompt: str) -> tuple[bytes, str]:
    """Pixels and infotext of one txt2img with the fixed seed."""
    from PIL import Image

    body = {"prompt": prompt, "seed": 1234, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 7}
    answer = server.call("POST", "/sdapi/v1/txt2img", json=body)
    pixels = Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB").tobytes()
    return pixels, json.loads(answer["info"])["infotexts"][0]


def test_every_epoch_is_an_sdxl_lora_in_a1111s_lora_folder(sdxl, project, trained):
    names = [f"{project}-01", f"{project}-02"]
    assert [Path(p).name for p in trained["files"]] == [f"{n}.safetensors" for n in names]
    assert (trained["epoch"], trained["step"]) == (2, 4), trained
    # The grid after training renders the epochs on the SDXL model too.
    assert trained["grid"] and "failed" not in trained["message"], trained["message"]
    listed = {lora["name"]: lora for lora in sdxl.call("GET", "/sdapi/v1/loras")}
    for name, path in zip(names, trained["files"]):
        assert listed[name]["path"] == path and Path(path).is_file()
        assert_sdxl_lora(path)
        # What A1111 itself read from the header (it sorts LoRAs into SD1/SD2/SDXL by it).
        assert listed[name]["metadata"]["ss_base_model_version"] == "sdxl_base_v1-0"


def test_a1111s_lora_loader_applies_every_epoch_with_every_key(sdxl, project, trained, baseline, new_log_lines):
    if new_log_lines() is None:
        pytest.skip("no A1111 log to read (set LORAKIT_A1111_LOG)")
    seen = len(new_log_lines())
    images = []
    for path in trained["files"]:
        name = Path(path).stem
        pixels, info = generate(sdxl, f"{PROMPT} <lora:{name}:1>")
        assert f"{name}: " in info and not any(c in info for c in LOADER_COMPLAINTS), info
        assert pixels != baseline, f"{name} did not change the image"
        images.append(pixels)
    assert images[0] != images[1], "two epochs of training gave the same image"
    window = new_log_lines()[seen:]
    assert not [c for c in LOADER_COMPLAINTS if c in window], window[-3000:]

    # Negative control: the same file with one module no SDXL has must show up in that log.
    tensors, metadata = read_lora(trained["files"][0])
    from safetensors.torch import save_file

    model = next(k.partition(".")[0] for k in tensors if "attn1_to_q" in k)
    tensors.update({f"{BOGUS}.{part}": tensors[f"{model}.{part}"].clone() for part in ("lora_down.weight", "lora_up.weight", "alpha")})
    bogus = Path(trained["files"][0]).with_name(f"{project}-bogus.safetensors")
    save_file(tensors, str(bogus), metadata={**metadata, "ss_output_name": bogus.stem})
    try:
        sdxl.call("POST", "/sdapi/v1/refresh-loras")
        seen = len(new_log_lines())
        generate(sdxl, f"{PROMPT} <lora:{bogus.stem}:1>")
        window = new_log_lines()[seen:]
    finally:
        bogus.unlink()
        sdxl.call("POST", "/sdapi/v1/refresh-loras")
    if "DEBUG" not in window:
        pytest.skip("A1111 logs above DEBUG, where key mismatches are not logged (start it with A1111H_LOGLEVEL=DEBUG)")
    assert "didn't match keys" in window and BOGUS in window, window[-3000:]


def test_the_sdxl_checkpoint_generates_exactly_as_before(sdxl, trained, baseline):
    # After the job and after the LoRA generations above (which A1111 keeps merged until the next one).
    assert sdxl.txt2img(PROMPT) == baseline


# ---- in-process ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xl(webui):
    """The in-process A1111 with the tiny SDXL loaded; the previous checkpoint comes back afterwards."""
    from modules import sd_models

    from lorakit_ext.webui import bridge

    shared = webui.shared
    previous = shared.sd_model.sd_checkpoint_info
    if not getattr(shared.sd_model, "is_sdxl", False):
        path = webui.webui / "models" / "Stable-diffusion" / "tiny-sdxl.safetensors"
        if not path.is_file():
            pytest.skip(f"no {path}: build it with the harness's make_tiny_sdxl.py")
        bridge.unmerge_networks(shared.sd_model)
        sd_models.reload_model_weights(info=sd_models.CheckpointInfo(str(path)))
    if not getattr(shared.sd_model, "is_sdxl", False):
        pytest.skip(f"{shared.sd_model.sd_checkpoint_info.filename} did not load as SDXL")
    auto_grid = shared.opts.data.get("lorakit_auto_grid", True)
    shared.opts.data["lorakit_auto_grid"] = False  # the HTTP tier covers the grid
    yield webui
    shared.opts.data["lorakit_auto_grid"] = auto_grid
    if shared.sd_model.sd_checkpoint_info.filename != previous.filename:
        bridge.unmerge_networks(shared.sd_model)
        sd_models.reload_model_weights(info=previous)


@pytest.fixture
def velocity_calls(monkeypatch):
    """How often the trainer built a v-prediction target (the loss's velocity)."""
    from lorakit_ext.train.loss import NoiseSchedule

    calls, original = [], NoiseSchedule.velocity

    def velocity(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(NoiseSchedule, "velocity", velocity)
    return calls


def new_project(xl, tag: str):
    from lorakit_ext.project import create_project
    from lorakit_ext.webui import host

    name = f"lkxl{tag}{int(time.time() * 1000) % 10**8}"
    project = create_project(host.projects_root(), name)
    for i in range(4):
        xl.txt2img(f"{PROMPT} {i}", seed=10 + i).save(project.dataset / f"cat{i}.png")
        (project.dataset / f"cat{i}.txt").write_text(f"{TRIGGER}, cat {i}", encoding="utf-8")
    return name


def train_button(task: str, name: str, **config):
    """The tab's Train button as A1111 runs it (queue lock, shared.state): (files, status, job)."""
    from modules.call_queue import wrap_gradio_gpu_call

    from lorakit_ext.webui import jobs

    handler = wrap_gradio_gpu_call(jobs.train_in_gradio, extra_outputs=[[], [], None])
    _, files, _, status = handler(task, name, json.dumps({**TINY, "trigger": TRIGGER, **config}))
    return files, status, jobs.job_status(task)


def test_in_process_sdxl_training_loads_fully_and_gives_the_model_back(xl, velocity_calls):
    from lorakit_ext.webui import bridge

    sd_model, name = xl.shared.sd_model, new_project(xl, "e")
    bridge.unmerge_networks(sd_model)
    before, image = bridge.fingerprint(sd_model), xl.txt2img(PROMPT, seed=3).tobytes()
    files, status, job = train_button("task(lkxl-eps)", name)
    assert job["status"] == "finished" and "Finished" in status, (status, job)
    assert [Path(f).name for f in files] == [f"{name}-01.safetensors", f"{name}-02.safetensors"]
    assert velocity_calls == [], "an ε-prediction model was trained on velocity"
    for path in files:
        assert_sdxl_lora(path)
        modules = {k.partition(".")[0] for k in read_lora(path)[0]}
        # A1111's loader (networks.load_network) against this SDXL: every module matches and fits.
        assert bridge.check_lora_file(Path(path)) == len(modules)
    assert before.changes(bridge.fingerprint(sd_model)) == []
    assert xl.txt2img(PROMPT, seed=3).tobytes() == image
    assert xl.txt2img(f"{PROMPT} <lora:{name}-02:1>", seed=3).tobytes() != image
    bridge.unmerge_networks(sd_model)
    assert xl.txt2img(PROMPT, seed=3).tobytes() == image


def test_a_changed_sdxl_text_encoder_fails_the_job_loudly(xl, monkeypatch):
    """The fingerprint covers SDXL's conditioner (both encoders), not only SD1's cond_stage_model:
    a bigG weight left changed by the job must fail it with ModelChanged's message."""
    import torch

    from lorakit_ext.train import loop
    from lorakit_ext.webui import bridge

    sd_model, name = xl.shared.sd_model, new_project(xl, "c")
    weight = sd_model.conditioner.embedders[1].wrapped.model.transformer.resblocks[5].mlp.c_fc.weight
    before, original = bridge.fingerprint(sd_model), loop.Trainer.run

    def run(self, *args):
        result = original(self, *args)
        with torch.no_grad():
            weight.neg_()  # exact both ways
        return result

    monkeypatch.setattr(loop.Trainer, "run", run)
    try:
        _, status, job = train_button("task(lkxl-changed)", name)
    finally:
        with torch.no_grad():
            weight.neg_()
    assert job["status"] == "failed" and "the loaded model differs after training" in job["error"], job
    assert "text encoder: weights changed for 1 entries" in job["error"], job["error"]
    assert before.changes(bridge.fingerprint(sd_model)) == []


def test_a_v_prediction_sdxl_trains_on_velocity_and_says_so(xl, velocity_calls, monkeypatch):
    from lorakit_ext.webui import bridge

    sd_model, name = xl.shared.sd_model, new_project(xl, "v")
    v_pred = {"zero_terminal_snr": True, "scale_v_pred_loss_like_noise_pred": True}  # the "NoobAI v-pred" preset
    # Zero terminal SNR is only for v-prediction: on this ε model it is refused before training.
    _, status, job = train_button("task(lkxl-ztsnr)", name, **v_pred)
    assert job["status"] == "failed" and "zero_terminal_snr" in job["error"], job
    assert velocity_calls == []

    image = xl.txt2img(PROMPT, seed=3).tobytes()
    # What A1111 sets when it loads a v-prediction SDXL (sd_models_xl.py: denoiser scaling is VScaling).
    monkeypatch.setattr(sd_model, "parameterization", "v")
    before = bridge.fingerprint(sd_model)
    files, status, job = train_button("task(lkxl-v)", name, output_name=f"{name}v", **v_pred)
    assert job["status"] == "finished", (status, job)
    assert len(velocity_calls) >= job["step"] == 4, "the v-prediction loss did not use velocity targets"
    for path in files:
        metadata = assert_sdxl_lora(path, prediction="v")
        assert (metadata["ss_zero_terminal_snr"], metadata["ss_scale_v_pred_loss_like_noise_pred"]) == ("True", "True")
        assert bridge.check_lora_file(Path(path)) > 0
    # The run's kohya reproduction trains the same way.
    toml = (Path(job["run_dir"]) / "kohya_config.toml").read_text(encoding="utf-8")
    assert "v_parameterization = true" in toml and "zero_terminal_snr = true" in toml, toml
    assert before.changes(bridge.fingerprint(sd_model)) == []
    monkeypatch.undo()
    assert xl.txt2img(PROMPT, seed=3).tobytes() == image


def test_cached_text_encoder_outputs_train_the_unet_alone_and_give_the_model_back(xl):
    from lorakit_ext.webui import bridge

    sd_model, name = xl.shared.sd_model, new_project(xl, "t")
    bridge.unmerge_networks(sd_model)
    before, image = bridge.fingerprint(sd_model), xl.txt2img(PROMPT, seed=3).tobytes()
    files, status, job = train_button("task(lkxl-cached)", name, output_name=f"{name}t", text_encoder_lr=0.0,
                                      shuffle_tags=False, cache_text_encoder_outputs=True)
    assert job["status"] == "finished", (status, job)
    for path in files:
        assert {k.split("_", 2)[1] for k in read_lora(path)[0]} == {"unet"}
        assert bridge.check_lora_file(Path(path)) > 0
    assert before.changes(bridge.fingerprint(sd_model)) == []
    assert xl.txt2img(PROMPT, seed=3).tobytes() == image


def test_the_train_form_takes_the_sdxl_defaults_when_an_sdxl_model_is_loaded(xl):
    from lorakit_ext.train_config import TrainConfig
    from lorakit_ext.webui import ui_form, ui_train

    sd15_form = ui_form.config_values(ui_train.SPECS, TrainConfig(output_name="mine", trigger="kat"))
    family, preset, *values = ui_train._follow_loaded_model("sd1", *sd15_form)
    assert (family, preset) == ("sdxl", "SDXL · kohya-colab XL")
    shown = dict(zip([spec.name for spec in ui_train.SPECS], values))
    assert shown["resolution"] == 1024 and shown["network_dim"] == 8 and shown["unet_lr"] == 3e-4
    assert (shown["output_name"], shown["trigger"]) == ("mine", "kat")  # the user's typing stays
    # Once set for SDXL, a page load or a tab switch leaves the user's edits alone.
    unchanged = ui_train._follow_loaded_model("sdxl", *values)
    assert all(update == {"__type__": "generic_update"} for update in unchanged)
