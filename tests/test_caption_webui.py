"""A1111's interrogators as captioners and the model-to-CPU rule, against small stand-ins for
A1111's ``modules`` (the real WebUI is exercised by the integration suite)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from PIL import Image

from lorakit_ext.dataset.captions import caption_path
from lorakit_ext.project import create_project
from lorakit_ext.webui.captioners import (
    A1111Blip,
    A1111DeepDanbooru,
    caption_project_in_webui,
    model_moved_to_cpu,
    webui_device_and_dtype,
)

torch.set_num_threads(1)
GPU = torch.device("meta")  # stands in for CUDA: a device that is not the CPU


class SdModel:
    """Where A1111's model is, as its parameters tell."""

    def __init__(self, where=GPU, lowvram=False):
        self.where, self.lowvram, self.moves = where, lowvram, []

    def parameters(self):
        yield torch.empty(1, device=self.where)

    def to(self, device):
        self.where = torch.device(device)
        self.moves.append(self.where.type)
        return self


class Shared(types.ModuleType):
    @property
    def sd_model(self):
        raise AssertionError("shared.sd_model loads a checkpoint when none is loaded; it must not be read")


class Interrogator:
    def __init__(self):
        self.blip_model, self.running_on_cpu, self.dtype, self.unloads = None, False, None, 0

    def load(self):
        raise AssertionError("load() also loads CLIP, which captions do not need")

    def load_blip_model(self):
        return torch.nn.Linear(2, 2)

    def generate_caption(self, image):
        assert self.dtype == torch.float16, "generate_caption casts images to interrogator.dtype"
        return f"a picture {image.size[0]} wide"

    def unload(self):
        self.unloads += 1


class DeepBooru:
    def __init__(self):
        self.model, self.stops = None, 0

    def start(self):
        self.model = object()

    def tag_multi(self, image, force_disable_ranks=False):
        return "1girl, smile" if force_disable_ranks else "(1girl:0.990), (smile:0.800)"

    def stop(self):
        self.stops += 1


@pytest.fixture
def a1111(monkeypatch):
    """Installs ``modules.shared/devices/sd_models/lowvram/deepbooru`` stand-ins that behave like
    A1111's for what the captioners use; returns them as a namespace."""
    mods = {name: types.ModuleType(f"modules.{name}") for name in ("devices", "sd_models", "lowvram", "deepbooru")}
    mods["shared"] = Shared("modules.shared")
    shared, devices, sd_models, lowvram = mods["shared"], mods["devices"], mods["sd_models"], mods["lowvram"]
    state = types.SimpleNamespace(sd_model=SdModel(), gc=0, lowvram_to_cpu=0, seen_during=[])
    devices.cpu, devices.device, devices.device_interrogate, devices.dtype = torch.device("cpu"), GPU, torch.device("cpu"), torch.float16
    devices.torch_gc = lambda: setattr(state, "gc", state.gc + 1)
    shared.cmd_opts = types.SimpleNamespace(no_half=False)
    shared.interrogator = Interrogator()
    mods["deepbooru"].model = DeepBooru()
    lowvram.send_everything_to_cpu = lambda: setattr(state, "lowvram_to_cpu", state.lowvram_to_cpu + 1)
    sd_models.model_data = state

    # As in A1111 v1.10.1's modules/sd_models.py.
    def send_model_to_cpu(m):
        if m.lowvram:
            lowvram.send_everything_to_cpu()
        else:
            m.to(devices.cpu)
        devices.torch_gc()

    sd_models.send_model_to_cpu = send_model_to_cpu
    sd_models.send_model_to_device = lambda m: None if m.lowvram else m.to(devices.device)
    package = types.ModuleType("modules")
    monkeypatch.setitem(sys.modules, "modules", package)
    for name, module in mods.items():
        setattr(package, name, module)
        monkeypatch.setitem(sys.modules, f"modules.{name}", module)
    state.modules = mods
    return state


def make_project(tmp_path, n=3):
    project = create_project(tmp_path, "p")
    for i in range(n):
        Image.new("RGB", (30 + i, 20), (i, 0, 0)).save(project.dataset / f"img_{i}.png")
    return project


class Watching:
    """A captioner that records where A1111's model was while it ran, and can fail."""

    name = "watching"

    def __init__(self, state, fail=False):
        self.state, self.fail = state, fail

    def load(self, device, dtype):
        self.state.seen_during.append(("load", self.state.sd_model.where.type, device, dtype))

    def caption(self, images):
        self.state.seen_during.append(("caption", self.state.sd_model.where.type))
        if self.fail:
            raise ValueError("captioner broke")
        return ["tag"] * len(images)

    def unload(self):
        pass


def test_model_waits_in_ram_while_captioning_and_comes_back(a1111, tmp_path):
    project = make_project(tmp_path)
    report = caption_project_in_webui(project, Watching(a1111))
    assert len(report.written) == 3
    assert a1111.seen_during[0] == ("load", "cpu", torch.device("cpu"), torch.float32)
    assert {entry[1] for entry in a1111.seen_during} == {"cpu"}
    assert a1111.sd_model.moves == ["cpu", "meta"] and a1111.gc >= 2


def test_model_comes_back_when_the_captioner_raises(a1111, tmp_path):
    project = make_project(tmp_path)
    with pytest.raises(ValueError, match="captioner broke"):
        caption_project_in_webui(project, Watching(a1111, fail=True))
    assert a1111.seen_during[-1] == ("caption", "cpu")
    assert a1111.sd_model.where == GPU


def test_model_already_in_ram_or_absent_stays_where_it_is(a1111):
    a1111.sd_model = SdModel(where=torch.device("cpu"))
    with model_moved_to_cpu():
        pass
    assert a1111.sd_model.moves == []
    a1111.sd_model = None
    with model_moved_to_cpu():
        pass  # no checkpoint loaded: nothing to move, and none gets loaded


def test_lowvram_model_moves_through_a1111s_own_helpers(a1111):
    a1111.sd_model = SdModel(where=torch.device("cpu"), lowvram=True)
    with model_moved_to_cpu():
        assert a1111.lowvram_to_cpu == 1
    assert a1111.sd_model.moves == []


def test_a1111_blip_loads_only_blip_in_half_precision(a1111, tmp_path):
    project = make_project(tmp_path, 2)
    blip = A1111Blip()
    caption_project_in_webui(project, blip)
    interrogator = a1111.modules["shared"].interrogator
    assert interrogator.blip_model.weight.dtype == torch.float16 and interrogator.unloads == 1
    assert caption_path(project.dataset / "img_1.png").read_text(encoding="utf-8") == "a picture 31 wide"


def test_a1111_deepdanbooru_writes_tags_without_scores(a1111, tmp_path):
    project = make_project(tmp_path, 2)
    caption_project_in_webui(project, A1111DeepDanbooru(), mode="overwrite")
    assert caption_path(project.dataset / "img_0.png").read_text(encoding="utf-8") == "1girl, smile"
    assert a1111.modules["deepbooru"].model.stops == 1 and a1111.sd_model.where == GPU
    # Unloading a DeepDanbooru that never loaded (its download failed, say) is harmless.
    a1111.modules["deepbooru"].model.model = None
    A1111DeepDanbooru().unload()
    assert a1111.modules["deepbooru"].model.stops == 1


def test_webui_device_follows_a1111s_flags(a1111):
    devices, shared = a1111.modules["devices"], a1111.modules["shared"]
    devices.device_interrogate = GPU
    assert webui_device_and_dtype() == (GPU, torch.float16)
    shared.cmd_opts.no_half = True
    assert webui_device_and_dtype() == (GPU, torch.float32)
