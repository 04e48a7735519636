"""The A1111 glue with small stand-ins for A1111's ``modules`` (the real thing: tests/integration).

The API tests need fastapi, httpx and python-multipart (all in A1111's own venv); they skip
without them.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
import threading
import time
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tiny_datasets import fill_dataset
from lorakit_ext.errors import UserError
from lorakit_ext.project import create_project
from lorakit_ext.train_config import TrainConfig
from lorakit_ext.train.events import Interrupted, Progress

ROOT = Path(__file__).resolve().parents[1]


class FakeState:
    def __init__(self):
        self.interrupted = self.skipped = self.stopping_generation = False
        self.job, self.job_count, self.job_no, self.sampling_step, self.sampling_steps, self.textinfo = "", 0, 0, 0, 0, None
        self.begun = []

    def begin(self, job="(unknown)"):
        self.begun.append(job)
        self.job, self.job_count, self.interrupted = job, -1, False

    def end(self):
        self.job = ""

    def interrupt(self):
        self.interrupted = True


@pytest.fixture
def a1111(monkeypatch, tmp_path):
    """Stand-ins for the parts of A1111's ``modules`` LoRA Kit reads."""
    package = types.ModuleType("modules")
    monkeypatch.setitem(sys.modules, "modules", package)

    def module(name, **attrs):
        mod = types.ModuleType(f"modules.{name}")
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, f"modules.{name}", mod)
        setattr(package, name, mod)
        return mod

    cmd_opts = SimpleNamespace(lora_dir=str(tmp_path / "models" / "Lora"), disable_extension_access=False, lowvram=False, api_auth=None)
    shared = module("shared", opts=SimpleNamespace(data={}, img_max_size_mp=200), cmd_opts=cmd_opts, state=FakeState(), sd_model=None, loaded_hypernetworks=[1])
    gc_calls = []
    module("devices", device=torch.device("cpu"), cpu=torch.device("cpu"), fp8=False, torch_gc=lambda: gc_calls.append(1))
    module("processing", StableDiffusionProcessing=type("P", (), {"cached_c": [1, 2], "cached_uc": [3, 4]}))
    module("call_queue", queue_lock=threading.Lock())
    module("paths", models_path=str(tmp_path / "models"))
    module("paths_internal", data_path=str(tmp_path / "webui"))
    module("lowvram", send_everything_to_cpu=lambda: None)
    return SimpleNamespace(shared=shared, root=tmp_path, gc_calls=gc_calls, projects=tmp_path / "webui" / "lorakit")


def load_install():
    spec = importlib.util.spec_from_file_location("lorakit_install", ROOT / "install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


A1111_PINS = {"torch": "2.1.2+cu121", "transformers": "4.30.2", "accelerate": "0.21.0", "numpy": "1.26.2", "Pillow": "9.5.0", "gradio": "3.41.2"}


# ---- install.py -------------------------------------------------------------------------------
def test_install_picks_a_peft_that_imports_with_the_hosts_pins():
    install = load_install()
    assert install.release("2.1.2+cu121") == (2, 1, 2) and install.release("0.14.0rc1") == (0, 14, 0)
    assert install.peft_requirement(A1111_PINS) == "peft>=0.11,<0.14"
    assert install.peft_requirement({**A1111_PINS, "transformers": "4.40.0"}) == "peft>=0.11,<0.14"  # accelerate still old
    assert install.peft_requirement({**A1111_PINS, "transformers": "4.46.1", "accelerate": "1.1.0"}) == "peft>=0.11"
    assert install.peft_fits("0.13.2", A1111_PINS) and not install.peft_fits("0.15.0", A1111_PINS) and not install.peft_fits(None, A1111_PINS)
    assert install.constraints({"torch": "2.1.2+cu121", "gradio": None}) == "torch==2.1.2+cu121\n"


def test_install_pins_the_host_and_falls_back_when_new_peft_does_not_import(monkeypatch):
    install = load_install()
    calls = []

    def run_pip(command, desc):
        constraints = command.split(' -c "')[1].rstrip('"')
        calls.append((command, Path(constraints).read_text()))

    monkeypatch.setitem(sys.modules, "launch", SimpleNamespace(is_installed=lambda name: False, run_pip=run_pip))
    versions = {"transformers": "4.46.1", "accelerate": "1.1.0", "torch": "2.5.1", "numpy": "1.26.2", "Pillow": "10.4.0", "gradio": "3.41.2"}
    monkeypatch.setattr(install, "installed", versions.get)
    monkeypatch.setattr(install, "_peft_imports", lambda: False)
    install.main()
    commands = [c for c, _ in calls]
    assert commands[0].startswith('install "peft>=0.11" -c "') and commands[1].startswith('install "imagehash>=4.3"')
    assert commands[2].startswith('install "peft>=0.11,<0.14"')
    for name in ("torch==2.5.1", "transformers==4.46.1", "gradio==3.41.2", "numpy==1.26.2", "Pillow==10.4.0"):
        assert name in calls[0][1]
    calls.clear()
    monkeypatch.setattr(install, "installed", {**versions, "peft": "0.17.0"}.get)
    monkeypatch.setitem(sys.modules, "launch", SimpleNamespace(is_installed=lambda name: True, run_pip=run_pip))
    install.main()
    assert calls == []


def test_install_adds_the_optional_optimizers_only_when_asked_and_never_moves_torch(monkeypatch):
    install = load_install()
    calls = []
    monkeypatch.setitem(sys.modules, "launch", SimpleNamespace(
        is_installed=lambda name: name in ("imagehash", "lion_pytorch"),
        run_pip=lambda command, desc: calls.append(command)))
    monkeypatch.setattr(install, "installed", {"peft": "0.13.2", "torch": "2.1.2", "transformers": "4.30.2", "accelerate": "0.21.0"}.get)
    monkeypatch.delenv(install.INSTALL_OPTIMIZERS_ENV, raising=False)
    install.main()
    assert calls == []  # not asked: nothing to install
    monkeypatch.setenv(install.INSTALL_OPTIMIZERS_ENV, "1")
    install.main()
    # What is missing, each under the constraints that pin torch and the rest of the host.
    assert [c.split('"')[1] for c in calls] == ["bitsandbytes", "prodigyopt", "dadaptation"]
    assert all(' -c "' in c for c in calls)


# ---- host -------------------------------------------------------------------------------------
def test_server_paths_outside_the_projects_and_lora_folders_are_refused_when_access_is_disabled(a1111, tmp_path):
    from lorakit_ext.webui import host

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert host.check_path_access(outside, "import images from") == outside.resolve()
    a1111.shared.cmd_opts.disable_extension_access = True
    with pytest.raises(host.PathAccessDenied, match="refusing to import images from"):
        host.check_path_access(outside, "import images from")
    (a1111.projects / "inbox").mkdir(parents=True)
    assert host.check_path_access(a1111.projects / "inbox", "read") == (a1111.projects / "inbox").resolve()
    assert host.check_path_access(host.lora_root() / "x", "read").parent == host.lora_root()
    with pytest.raises(host.PathAccessDenied):
        host.check_path_access(a1111.projects / ".." / "elsewhere", "read")
    # A link in the projects folder into another allowed folder is still a link out of its own.
    (a1111.projects / "to-loras").symlink_to(host.lora_root(), target_is_directory=True)
    with pytest.raises(host.PathAccessDenied):
        host.check_path_access(a1111.projects / "to-loras", "read")


def test_lora_folder_and_projects_root_follow_the_settings(a1111, tmp_path):
    from lorakit_ext.webui import host

    assert host.lora_dir() == (tmp_path / "models" / "Lora").resolve() and host.lora_dir().is_dir()
    assert host.projects_root() == a1111.projects.resolve()
    a1111.shared.opts.data.update(lorakit_lora_subfolder="mine", lorakit_projects_root=str(tmp_path / "p"))
    assert host.lora_dir() == (tmp_path / "models" / "Lora" / "mine").resolve()
    assert host.projects_root() == (tmp_path / "p").resolve()
    for bad in ("../escape", str(tmp_path)):
        a1111.shared.opts.data["lorakit_lora_subfolder"] = bad
        with pytest.raises(UserError):
            host.lora_dir()
    with pytest.raises(UserError, match="built-in Lora extension"):
        host.refresh_loras()


# ---- progress → shared.state --------------------------------------------------------------------
def a1111_eta(state, now: float) -> float:
    """A1111's own ETA (modules/progress.py): elapsed since time_start, scaled by the progress."""
    from lorakit_ext.webui.job_progress import a1111_progress

    progress = a1111_progress(state)
    elapsed = now - state.time_start
    return elapsed / progress - elapsed


def test_progress_drives_a1111s_progress_bar_and_text(a1111):
    from lorakit_ext.train.events import clock
    from lorakit_ext.webui.job_progress import StateMirror, a1111_progress, textinfo

    state = FakeState()
    mirror = StateMirror(state)
    mirror(Progress("caching", step=1, total_steps=4, message="caching latents 1/4"))
    assert state.textinfo == "caching latents 1/4" and state.job_count == 0
    for step in range(1, 13):  # 3 epochs of 4 steps
        mirror(Progress("training", epoch=(step - 1) // 4 + 1, epochs=3, step=step, total_steps=12, loss=0.5))
        assert a1111_progress(state) == pytest.approx(step / 12)
        assert state.job_count == 3 and state.job_no == (step - 1) // 4
    mirror(Progress("training", message="CUDA graphs off: no CUDA"))  # a note, not a position
    assert (state.job_no, state.sampling_step) == (2, 4) and state.textinfo.startswith("epoch 3/3")
    p = Progress("training", epoch=3, epochs=10, step=120, total_steps=630, loss=0.12345, it_per_s=2.1, eta_s=296)
    assert textinfo(p) == "epoch 3/10 · step 120/630 · loss 0.1235 · 2.1 it/s"
    assert textinfo(Progress("saving", epoch=1, epochs=2, step=2, total_steps=4)) == "epoch 1/2 · step 2/4 · saving"
    assert clock(3723) == "1:02:03"


def test_one_eta_ours_in_a1111s_bar_and_the_grid_restarts_it(a1111):
    """The text carries no ETA; A1111's bar computes the trainer's from the time_start we set, also
    after a long latent caching; a grid then starts A1111's counts and clock afresh."""
    from lorakit_ext.webui.job_progress import StateMirror, grid_cell, grid_started

    state = FakeState()
    state.time_start = time.time() - 600  # ten minutes of caching latents before the first step
    mirror = StateMirror(state)
    for step, eta in ((1, 95.0), (5, 70.0), (20, 0.0)):
        mirror(Progress("training", epoch=(step - 1) // 10 + 1, epochs=2, step=step, total_steps=20, loss=0.5, it_per_s=0.2, eta_s=eta))
        assert "ETA" not in state.textinfo
        if step < 20:
            assert a1111_eta(state, time.time()) == pytest.approx(eta, abs=0.5)
    mirror(Progress("saving", epoch=2, epochs=2, step=20, total_steps=20))
    assert state.textinfo == "epoch 2/2 · step 20/20 · saving"
    before = time.time()
    grid_started(state, 6)
    assert (state.job_count, state.job_no, state.sampling_step) == (6, 0, 0) and state.time_start >= before
    assert state.textinfo == "epoch grid · 6 cells"
    grid_cell(state, 2, 6)
    assert state.textinfo == "epoch grid · cell 2/6"


def test_each_grid_cell_the_xyz_script_renders_is_announced(a1111):
    """The script copies ``p`` per cell and process_images calls ``init`` once per copy."""
    import copy

    from lorakit_ext.webui import xyz

    class Txt2Img:
        def init(self, all_prompts, all_seeds, all_subseeds):
            self.initialised = True

    state = FakeState()
    p = xyz._announcing_cells(Txt2Img, 3, state)()
    for number in (1, 2, 3):
        cell = copy.copy(p)
        cell.init([], [], [])
        assert cell.initialised and state.textinfo == f"epoch grid · cell {number}/3"


# ---- bridge -----------------------------------------------------------------------------------
class FakeSD(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 1))
        self.cond_stage_model = nn.Sequential(nn.Linear(4, 4))
        self.first_stage_model = nn.Linear(2, 2)


def test_bridge_refuses_what_it_cannot_train(a1111, monkeypatch):
    from lorakit_ext.webui import bridge

    sd = FakeSD()
    assert bridge.refusal(sd) is None
    sd.is_sd3 = True
    assert "SD3" in bridge.refusal(sd)
    del sd.is_sd3
    a1111.shared.cmd_opts.lowvram = True
    assert "--lowvram" in bridge.refusal(sd)
    a1111.shared.cmd_opts.lowvram = False
    sd.first_stage_model.weight.data = sd.first_stage_model.weight.data.to(torch.float8_e4m3fn)
    assert "fp8" in bridge.refusal(sd)
    monkeypatch.setattr(bridge, "_is_forge", lambda: True)
    assert "Forge" in bridge.refusal(FakeSD())
    with pytest.raises(UserError, match="no checkpoint"):
        bridge.loaded_model()


def test_bridge_unmerges_loras_and_catches_a_changed_model(a1111, monkeypatch):
    from lorakit_ext.webui import bridge

    sd = FakeSD()
    linear = sd.model.diffusion_model[0]
    original = linear.weight.detach().clone()
    linear.network_weights_backup = original.clone()
    linear.weight.data += 1
    linear.network_current_names = (("merged", 1.0, 1.0, None),)
    restore = lambda m: m.weight.copy_(m.network_weights_backup)  # noqa: E731
    monkeypatch.setitem(sys.modules, "networks", SimpleNamespace(loaded_networks=["net"], network_restore_weights_from_backup=restore))
    monkeypatch.setattr("lorakit_ext.models.families.adapter_for", lambda sd_model, **kw: SimpleNamespace(sd_model=sd_model, **kw))
    a1111.shared.sd_model = sd
    with bridge.training_model(TrainConfig()) as model:
        assert model.sd_model is sd and model.clip_skip == 2
        assert torch.equal(linear.weight, original) and linear.network_current_names == ()
        assert sys.modules["networks"].loaded_networks == [] and a1111.shared.loaded_hypernetworks == []
    assert sys.modules["modules.processing"].StableDiffusionProcessing.cached_c == [None, None] and a1111.gc_calls
    with pytest.raises(bridge.ModelChanged, match=r"unet: weights changed for 1 entries \(0.weight\)"):
        with bridge.training_model(TrainConfig()):
            with torch.no_grad():
                linear.weight[0, 0] += 1e-3
    with pytest.raises(bridge.ModelChanged, match="requires_grad changed"):
        with bridge.training_model(TrainConfig()):
            sd.cond_stage_model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="boom"):
        with bridge.training_model(TrainConfig()):
            raise ValueError("boom")


def test_medvram_hooks_are_lifted_for_the_job_and_put_back(a1111):
    from lorakit_ext.webui import bridge

    sd = FakeSD()
    sd.lowvram = True

    def send_me_to_gpu(module, _):
        pass

    def other_hook(module, _):
        pass

    sd.model.register_forward_pre_hook(send_me_to_gpu)
    sd.first_stage_model.register_forward_pre_hook(send_me_to_gpu)
    sd.model.register_forward_pre_hook(other_hook)
    sd.first_stage_model.encode = lambda x: x
    before = {m: dict(m._forward_pre_hooks) for m in (sd.model, sd.first_stage_model)}
    with bridge.whole_model_on_device(sd):
        assert list(sd.model._forward_pre_hooks.values()) == [other_hook]
        assert not sd.first_stage_model._forward_pre_hooks and "encode" not in vars(sd.first_stage_model)
    assert {m: dict(m._forward_pre_hooks) for m in (sd.model, sd.first_stage_model)} == before
    assert "encode" in vars(sd.first_stage_model)


def test_post_save_check_fails_on_keys_a1111_does_not_match(a1111, monkeypatch, tmp_path):
    from lorakit_ext.webui import bridge

    path = tmp_path / "kat-01.safetensors"
    names = ("lora_unet_a", "lora_unet_b")
    save_file({f"{n}.{part}": torch.zeros(2, 2) for n in names for part in ("lora_down.weight", "lora_up.weight")}, str(path))
    weight = torch.zeros(2, 2)
    good = SimpleNamespace(network_key="lora_unet_a.lora_down.weight", sd_module=SimpleNamespace(weight=weight), calc_updown=lambda w: (torch.zeros(2, 2), None))
    bad = SimpleNamespace(network_key="lora_unet_b.alpha", sd_module=SimpleNamespace(weight=weight), calc_updown=lambda w: (torch.zeros(4), None))
    loaded = {"a": good}
    networks = SimpleNamespace(load_network=lambda name, on_disk: SimpleNamespace(modules=loaded))
    monkeypatch.setitem(sys.modules, "networks", networks)
    monkeypatch.setitem(sys.modules, "network", SimpleNamespace(NetworkOnDisk=lambda name, filename: (name, filename)))
    with pytest.raises(bridge.LoraFileRejected, match=r"1 of 2 modules match no layer \(lora_unet_b\)"):
        bridge.check_lora_file(path)
    loaded["b"] = bad
    with pytest.raises(bridge.LoraFileRejected, match=r"1 do not fit their layer \(lora_unet_b\)"):
        bridge.check_lora_file(path)
    loaded["b"] = SimpleNamespace(**{**vars(bad), "calc_updown": good.calc_updown})
    assert bridge.check_lora_file(path) == 2


# ---- jobs -------------------------------------------------------------------------------------
def wait_for(job_id, timeout=10.0):
    from lorakit_ext.webui import jobs

    deadline = time.monotonic() + timeout
    while jobs.job_status(job_id)["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, jobs.job_status(job_id)
        time.sleep(0.01)
    with sys.modules["modules.call_queue"].queue_lock:  # the runner has let go of A1111's lock
        return jobs.job_status(job_id)


@pytest.fixture
def project(a1111):
    fill_dataset(create_project(a1111.projects, "kat").dataset)
    return "kat"


@pytest.mark.parametrize(
    "raised, status, error",
    [(None, "finished", None), (Interrupted(), "interrupted", None), (UserError("no images"), "failed", "no images"),
     (ValueError("bad"), "failed", "ValueError: bad")],
)
def test_job_ends_with_a_status_and_a1111s_state_is_reset(a1111, project, monkeypatch, raised, status, error):
    from lorakit_ext.webui import jobs

    def work(job, config):
        assert a1111.shared.state.job == "lorakit-train" and not sys.modules["modules.call_queue"].queue_lock.acquire(blocking=False)
        if raised is not None:
            raise raised

    monkeypatch.setattr(jobs, "_train", work)
    data = wait_for(jobs.start_training(project, TrainConfig()))
    assert (data["status"], data["error"], data["kind"], data["project"]) == (status, error, "train", "kat")
    state = a1111.shared.state
    assert (state.interrupted, state.job_count, state.job) == (False, 0, "")
    assert jobs.job_status()["id"] == data["id"]


def test_interrupting_queued_and_running_jobs(a1111, project, monkeypatch):
    from lorakit_ext.webui import jobs

    started = threading.Event()

    def work(job, config):
        started.set()
        while not a1111.shared.state.interrupted:
            time.sleep(0.01)
        raise Interrupted()

    monkeypatch.setattr(jobs, "_train", work)
    lock = sys.modules["modules.call_queue"].queue_lock
    with lock:  # a generation holds the lock: the job waits
        queued = jobs.start_training(project, TrainConfig())
        time.sleep(0.05)
        assert jobs.job_status(queued)["status"] == "queued"
        assert jobs.interrupt(queued) is True
    assert wait_for(queued)["message"] == "cancelled before it started"
    running = jobs.start_training(project, TrainConfig())
    assert started.wait(5) and jobs.interrupt() is True
    assert wait_for(running)["status"] == "interrupted" and jobs.interrupt(running) is False
    with pytest.raises(jobs.UnknownJob):
        jobs.job_status("nope")
    with pytest.raises(UserError, match="no project"):
        jobs.start_training("ghost", TrainConfig())
    with pytest.raises(UserError, match="invalid training settings"):
        jobs.start_training(project, TrainConfig(train_batch_size=0))


def test_gradio_handler_returns_status_last_and_records_losses(a1111, project, monkeypatch):
    from lorakit_ext.webui import jobs

    def work(job, config):
        for step, loss in ((1, 0.5), (2, 0.5), (3, 0.25)):
            job.record(Progress("training", epoch=1, epochs=1, step=step, total_steps=3, loss=loss))

    monkeypatch.setattr(jobs, "_train", work)
    losses, files, grid, status = jobs.train_in_gradio("task(abc)", project, '{"max_train_epochs": 1}')
    assert losses == [[1, 0.5], [3, 0.25]] and files == [] and grid is None and status.startswith("<p><b>Finished</b>")
    assert jobs.job_status("task(abc)")["status"] == "finished"
    *_, status = jobs.train_in_gradio("task(def)", project, "{not json")
    assert "Failed" in status and "not valid JSON" in status


def test_grid_prompt_names_the_first_epoch():
    from lorakit_ext.webui.jobs import grid_prompt
    from lorakit_ext.webui.settings import DEFAULT_TEST_PROMPT, parse_seeds

    assert grid_prompt(DEFAULT_TEST_PROMPT, "kat3r1na", "kat", "kat-03") == (
        "kat3r1na, a photograph, a professional portrait of a model in high street fashion <lora:kat-03:1>")
    assert grid_prompt("a cat", "t", "kat", "kat-01") == "a cat <lora:kat-01:1>"
    assert parse_seeds(" 1, 2 ,") == [1, 2]
    with pytest.raises(UserError):
        parse_seeds("one")


# ---- registration -----------------------------------------------------------------------------
def test_script_registers_tab_settings_and_api(a1111, monkeypatch):
    import lorakit_ext.webui as webui

    registered = {}
    callbacks = types.ModuleType("modules.script_callbacks")
    for kind in ("on_ui_settings", "on_ui_tabs", "on_app_started"):
        setattr(callbacks, kind, lambda fn, kind=kind: registered.__setitem__(kind, fn))
    monkeypatch.setitem(sys.modules, "modules.script_callbacks", callbacks)
    sys.modules["modules"].script_callbacks = callbacks
    runpy.run_path(str(ROOT / "scripts" / "lorakit.py"))
    assert set(registered) == {"on_ui_settings", "on_ui_tabs", "on_app_started"}
    fake_ui = SimpleNamespace(build_tab=lambda: ("blocks", "LoRA Kit", "lorakit"))
    monkeypatch.setitem(sys.modules, "lorakit_ext.webui.ui", fake_ui)
    monkeypatch.setattr(webui, "ui", fake_ui, raising=False)
    assert registered["on_ui_tabs"]() == [("blocks", "LoRA Kit", "lorakit")]
    options = {}
    a1111.shared.OptionInfo = lambda default, label, component=None, args=None, **kw: SimpleNamespace(default=default, **kw)
    a1111.shared.opts.add_option = options.__setitem__
    monkeypatch.setitem(sys.modules, "gradio", SimpleNamespace(Dropdown="Dropdown", Textbox="Textbox", Slider="Slider"))
    registered["on_ui_settings"]()
    assert options["lorakit_auto_grid"].default is True and options["lorakit_grid_seeds"].default == "1,2"
    assert options["lorakit_projects_root"].restrict_api and options["lorakit_lora_subfolder"].restrict_api
    assert {o.section for o in options.values()} == {("lorakit", "LoRA Kit")}


# ---- HTTP API ---------------------------------------------------------------------------------
@pytest.fixture
def client(a1111):
    for name in ("fastapi", "httpx", "multipart"):
        pytest.importorskip(name, reason=f"the API tests need {name} (A1111's venv has it)")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lorakit_ext.webui import api

    app = FastAPI()
    api.mount(app)
    return TestClient(app)


def test_api_maps_errors_to_http_statuses(a1111, client, project, monkeypatch, tmp_path):
    from lorakit_ext.webui import host, jobs

    v1 = "/lorakit/v1"
    assert client.get(f"{v1}/projects").json()["projects"] == ["kat"]
    assert client.get(f"{v1}/projects/ghost").status_code == 404
    assert client.post(f"{v1}/projects", json={"name": "../x"}).status_code == 400
    assert client.post(f"{v1}/projects/kat/plan", json={"config": {"bogus": 1}}).status_code == 400
    assert client.get(f"{v1}/jobs/nope").status_code == 404
    a1111.shared.cmd_opts.disable_extension_access = True
    answer = client.post(f"{v1}/projects/kat/import/folder", json={"folder": str(tmp_path)})
    assert answer.status_code == 403 and "refusing to import images from" in answer.json()["detail"]
    monkeypatch.setattr(jobs, "_train", lambda job, config: None)
    answer = client.post(f"{v1}/projects/kat/train", json={"config": {"max_train_epochs": 1}})
    assert answer.status_code == 202 and wait_for(answer.json()["job_id"])["status"] == "finished"
    assert client.get(f"{v1}/jobs/latest").json()["id"] == answer.json()["job_id"]
    monkeypatch.setattr(jobs, "start_grid", lambda *a, **k: (_ for _ in ()).throw(host.FeatureMissing("no xyz")))
    assert client.post(f"{v1}/projects/kat/grid", json={"lora_names": ["kat-01"]}).status_code == 501
    a1111.shared.cmd_opts.api_auth = "ann:s3cret:x,bob:pw"
    assert client.get(f"{v1}/projects").status_code == 401
    assert client.get(f"{v1}/projects", auth=("ann", "wrong")).status_code == 401
    assert client.get(f"{v1}/projects", auth=("ann", "s3cret:x")).status_code == 200


# ---- the model adapter ------------------------------------------------------------------------
def test_clip_skip_beyond_the_text_encoders_depth_is_refused_before_training(a1111, tiny_sd15):
    """The tiny text encoder has 4 layers: clip_skip 5 used to pass and end as an IndexError."""
    from lorakit_ext.models.ldm import LdmModel
    from lorakit_ext.webui import bridge

    sd_model = tiny_sd15[0]
    assert LdmModel(sd_model, clip_skip=4).clip_skip == 4
    with pytest.raises(UserError, match=r"clip_skip 5 .* 4 layers; use a clip_skip from 1 to 4"):
        LdmModel(sd_model, clip_skip=5)
    a1111.shared.sd_model = sd_model
    before = {k: v.clone() for k, v in sd_model.state_dict().items()}
    with pytest.raises(UserError, match="from 1 to 4"):
        with bridge.training_model(TrainConfig(clip_skip=12)):
            pytest.fail("no training may start")
    assert all(torch.equal(before[k], v) for k, v in sd_model.state_dict().items())
