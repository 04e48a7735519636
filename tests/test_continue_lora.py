"""Continuing from an existing LoRA (kohya's ``network_weights``): the run starts from the file's
weights, and a file of another shape is refused with what differs, before the first step."""

from __future__ import annotations

import pytest
import torch
from tiny_datasets import fill_dataset

from lorakit_ext.errors import UserError
from lorakit_ext.export.writer import read_lora_file
from lorakit_ext.models.checkpoint import load_sd_checkpoint
from lorakit_ext.models.ldm import LdmModel
from lorakit_ext.project import create_project
from lorakit_ext.train.loop import Trainer, TrainJob
from lorakit_ext.train.network import injected
from lorakit_ext.train.preflight import preflight
from lorakit_ext.train_config import TrainConfig

SMALL = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, num_repeats=1, max_train_epochs=1, optimizer="AdamW",
             network_dim=4, network_alpha=2.0, unet_lr=1e-3, lr_scheduler="constant", validate_every_n_epochs=0)


@pytest.fixture(scope="module")
def first_run(tiny_sd15_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("first")
    project = create_project(tmp / "projects", "kat")
    fill_dataset(project.dataset)
    return project, _train(tiny_sd15_dir, project, tmp, "a", TrainConfig(**SMALL))


def _model(tiny_sd15_dir):
    sd_model, _ = load_sd_checkpoint(tiny_sd15_dir / "tiny-sd15.safetensors")
    return LdmModel(sd_model.eval(), clip_skip=2)


def _train(tiny_sd15_dir, project, tmp, name, config):
    job = TrainJob(config.validate(), project, tmp / name, project.runs / name, base_model_name="tiny-sd15")
    job.run_dir.mkdir(parents=True)
    return Trainer(_model(tiny_sd15_dir), job).run()


def test_a_continued_network_starts_from_the_files_weights(tiny_sd15_dir, first_run):
    _, result = first_run
    tensors, _ = read_lora_file(result.files[-1])
    with injected(_model(tiny_sd15_dir), TrainConfig(**SMALL), seed=5) as network:
        network.load_weights(result.files[-1])
        exported = {f"{m.kohya_name}.lora_down.weight": m.down for m in network.export()}
        exported.update({f"{m.kohya_name}.lora_up.weight": m.up for m in network.export()})
    assert set(exported) == {k for k in tensors if not k.endswith(".alpha")}
    assert all(torch.equal(exported[k].half(), tensors[k]) for k in exported)
    assert any(tensors[k].abs().max() > 0 for k in exported if k.endswith("lora_up.weight"))  # trained, not fresh


def test_a_run_continued_from_a_file_trains_on_from_it(tiny_sd15_dir, first_run, tmp_path):
    project, first = first_run
    config = TrainConfig(**{**SMALL, "network_weights": str(first.files[-1]), "output_name": "more"})
    more = _train(tiny_sd15_dir, project, tmp_path, "b", config)
    start, cont = (read_lora_file(p)[0] for p in (first.files[-1], more.files[-1]))
    ups = [k for k in start if k.endswith("lora_up.weight")]

    def distance(a, b):
        return sum(float((a[k].float() - b[k].float()).abs().sum()) for k in ups)

    # One more epoch moves the weights on from the file's, not from zero (where a fresh run starts).
    zero = {k: torch.zeros_like(start[k]) for k in ups}
    assert 0 < distance(cont, start) < distance(start, zero) < distance(cont, zero)


@pytest.mark.parametrize("changes, message", [
    ({"network_dim": 8, "network_alpha": 4.0}, "has rank 4 where this run has 8"),
    ({"network_alpha": 1.0}, "has alpha 2 where this run has 1"),
    ({"network_type": "LoCon"}, "of this run's modules are not in it"),
])
def test_a_file_of_another_shape_is_refused_with_what_differs(tiny_sd15_dir, first_run, changes, message):
    _, result = first_run
    with injected(_model(tiny_sd15_dir), TrainConfig(**{**SMALL, **changes}), seed=5) as network:
        with pytest.raises(UserError, match=message):
            network.load_weights(result.files[-1])


def test_a_missing_file_is_refused_before_the_model_loads(first_run, tmp_path):
    project, _ = first_run
    config = TrainConfig(**{**SMALL, "network_weights": str(tmp_path / "nope.safetensors")})
    with pytest.raises(UserError, match="nope.safetensors does not exist"):
        preflight(project, config, tmp_path / "out")
