"""Validation loss per epoch: which images it measures, that it repeats exactly and leaves
training's numbers alone, and where it is written (loss.csv, run.json, every epoch file)."""

from __future__ import annotations

import json

import pytest
from tiny_datasets import fill_dataset

from lorakit_ext.export.writer import read_lora_metadata
from lorakit_ext.models.checkpoint import load_sd_checkpoint
from lorakit_ext.models.ldm import LdmModel
from lorakit_ext.project import create_project
from lorakit_ext.train.loop import Trainer, TrainJob
from lorakit_ext.train.plan import plan_for, split_items, validation_line
from lorakit_ext.train.preflight import dataset_schedule
from lorakit_ext.train_config import TrainConfig

SMALL = dict(
    resolution=64, min_bucket_reso=64, max_bucket_reso=128, num_repeats=1, train_batch_size=2, max_train_epochs=2,
    optimizer="AdamW", network_dim=4, network_alpha=2.0, unet_lr=1e-3, text_encoder_lr=1e-4, lr_scheduler="constant",
    keep_only_last_n_epochs=0,
)


def test_the_held_out_images_depend_on_seed_and_count_only_and_small_sets_hold_none_out():
    images = [f"img{i}" for i in range(30)]
    training, held = split_items(images, 0.1, seed=42)
    assert len(held) == 3 and len(training) == 27 and set(training) | set(held) == set(images)
    assert split_items(images, 0.1, seed=42) == (training, held)
    assert split_items(images, 0.1, seed=7)[1] != held
    assert split_items(images[:19], 0.1, seed=42)[1] == []  # below 20 images every one trains
    assert split_items(images[:20], 0.01, seed=42)[1] != []  # never fewer than one once holding out
    assert "3 of 30 images held out" in validation_line(30, 0.1)
    assert "training images" in validation_line(12, 0.1) and "fewer than 20" in validation_line(12, 0.1)
    plan = plan_for(TrainConfig(num_repeats=10, train_batch_size=2), 30)
    assert plan.lines[0].startswith("Found 27 images") and "3 of 30 images held out" in plan.text
    # A run that never validates holds nothing out.
    assert plan_for(TrainConfig(validate_every_n_epochs=0), 30).lines[0].startswith("Found 30 images")


def _train(tiny_sd15_dir, project, tmp_path, name, **overrides):
    sd_model, _ = load_sd_checkpoint(tiny_sd15_dir / "tiny-sd15.safetensors")
    config = TrainConfig(**{**SMALL, **overrides}).validate()
    job = TrainJob(config, project, tmp_path / name, project.runs / name, base_model_name="tiny-sd15")
    job.run_dir.mkdir(parents=True)
    model = LdmModel(sd_model.eval(), clip_skip=config.clip_skip, max_token_length=config.max_token_length)
    return Trainer(model, job).run()


@pytest.fixture
def small_project(tmp_path):
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)
    return project


def test_validation_repeats_exactly_and_leaves_the_training_losses_alone(tiny_sd15_dir, small_project, tmp_path):
    first = _train(tiny_sd15_dir, small_project, tmp_path, "a")
    again = _train(tiny_sd15_dir, small_project, tmp_path, "b")
    without = _train(tiny_sd15_dir, small_project, tmp_path, "c", validate_every_n_epochs=0)
    assert [(e, s) for e, s, _ in first.validation] == [(1, 2), (2, 4)]
    assert first.validation == again.validation
    # Same images (4: none held out), same steps, same numbers whether or not validation runs.
    assert first.losses == without.losses and without.validation == []
    assert "ss_validation_loss" not in read_lora_metadata(without.files[-1])


def test_held_out_images_do_not_train_and_the_loss_is_written_beside_the_epochs(tiny_sd15_dir, tmp_path):
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset, count=20)
    config = TrainConfig(**SMALL)
    data = dataset_schedule(config, project.dataset)
    assert len(data.items) == 18 and len(data.validation_items) == 2
    assert not {i.image_path for i in data.items} & {i.image_path for i in data.validation_items}
    result = _train(tiny_sd15_dir, project, tmp_path, "held", max_train_epochs=3, validate_every_n_epochs=2)
    assert result.steps == 3 * 9  # 18 training images, batch 2
    assert [e for e, _, _ in result.validation] == [2, 3]  # every 2 epochs, and the last
    rows = (result.run_dir / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,validation_loss"
    measured = {int(r.split(",")[0]): float(r.split(",")[2]) for r in rows[1:] if r.split(",")[2]}
    assert measured == {s: pytest.approx(v, abs=1e-6) for _, s, v in result.validation}
    run = json.loads((result.run_dir / "run.json").read_text())
    assert [row["epoch"] for row in run["validation"]] == [2, 3]
    by_epoch = {e: v for e, _, v in result.validation}
    for epoch, path in enumerate(result.files, start=1):
        written = read_lora_metadata(path).get("ss_validation_loss")
        assert (written is None) if epoch not in by_epoch else float(written) == pytest.approx(by_epoch[epoch], abs=1e-6)
    assert "2 of 20 images held out" in (result.run_dir / "plan.txt").read_text()


def test_every_epoch_end_measures_the_same_noise_drawn_once_and_reads_the_device_once(monkeypatch):
    """The validation loss compares epochs only if each one sees the same noise; drawing it once
    (and summing on the device) also keeps the GPU from waiting at every batch and timestep."""
    import torch

    from lorakit_ext.train import validation

    entries = [validation._Entry(torch.full((4, 8, 8 + 8 * (i % 2)), float(i)), f"c{i}", (0,) * 6, 100 + i) for i in range(6)]
    drawn = []
    monkeypatch.setattr(validation, "_noise", lambda entry, t: drawn.append((entry.seed, t)) or torch.ones(entry.latent.shape) * t / 1000)
    reads = []

    class Counted(torch.Tensor):
        def __float__(self):
            reads.append(1)
            return super().__float__()

    def error(latents, text, sizes, noise, timesteps):
        return (latents - noise).square().mean(dim=(1, 2, 3)).as_subclass(Counted)

    held = validation.ValidationSet(entries, held_out=True)
    first = held.loss(error, lambda indices: None)
    second = held.loss(error, lambda indices: None)
    assert first == second
    assert sorted(drawn) == sorted((e.seed, t) for e in entries for t in validation.TIMESTEPS)
    assert len(reads) == 2  # one read per epoch end, not one per batch and timestep
    expected = sum(((e.latent - t / 1000) ** 2).mean().item() for e in entries for t in validation.TIMESTEPS) / (6 * 5)
    assert first == pytest.approx(expected, rel=1e-6)
