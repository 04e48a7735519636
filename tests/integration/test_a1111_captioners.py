"""Captioning inside the real A1111 (in-process; see a1111_inprocess.py for how to run).

A1111's own BLIP and DeepDanbooru download their weights on first use, which these offline tests
cannot do; what runs here is everything around them: the checkpoint waiting in RAM while a
captioner works (also when it fails), the runner writing captions, and A1111 generating the same
pixels afterwards.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from a1111_inprocess import skip_reason, start
from PIL import Image

from lorakit_ext.project import create_project

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


class FixedCaptioner:
    name = "fixed"

    def __init__(self, fail: bool = False):
        self.fail = fail

    def load(self, device, dtype):
        pass

    def caption(self, images):
        if self.fail:
            raise RuntimeError("captioner exploded")
        return [f"kat3r1na, {img.width}x{img.height}" for img in images]

    def unload(self):
        pass


def fingerprint(model) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def webui():
    return start()


@pytest.fixture
def project(tmp_path):
    project = create_project(tmp_path, "cap")
    for i in range(3):
        Image.new("RGB", (64 + 8 * i, 64), (40 * i, 90, 200)).save(project.dataset / f"{i}.png")
    return project


def test_captions_are_written_and_a1111_generates_the_same_image_afterwards(webui, project):
    from lorakit_ext.webui.captioners import caption_project_in_webui

    before = webui.txt2img("a photo of a cat", seed=7)
    weights = fingerprint(webui.shared.sd_model)
    captioner = FixedCaptioner()
    report = caption_project_in_webui(project, captioner, batch_size=2)
    assert sorted(p.read_text() for p in project.dataset.glob("*.txt")) == [
        "kat3r1na, 64x64", "kat3r1na, 72x64", "kat3r1na, 80x64"
    ]
    assert report.as_dict()["written"]
    assert fingerprint(webui.shared.sd_model) == weights
    assert webui.txt2img("a photo of a cat", seed=7).tobytes() == before.tobytes()


def test_a_failing_captioner_leaves_a1111_working(webui, project):
    from lorakit_ext.webui.captioners import caption_project_in_webui

    before = webui.txt2img("a photo of a cat", seed=8)
    weights = fingerprint(webui.shared.sd_model)
    with pytest.raises(RuntimeError, match="captioner exploded"):
        caption_project_in_webui(project, FixedCaptioner(fail=True), batch_size=2)
    assert not list(project.dataset.glob("*.txt"))
    assert fingerprint(webui.shared.sd_model) == weights
    assert webui.txt2img("a photo of a cat", seed=8).tobytes() == before.tobytes()
