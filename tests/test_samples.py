"""Samples while training: drawn every N epochs (and after the last) with the LoRA as trained so
far, without changing the training's numbers or the base weights."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from tiny_datasets import fill_dataset

from lorakit_ext.cli import main

from lorakit_ext.compare.sample import headless_sampler
from lorakit_ext.dataset.tags import typical_prompt
from lorakit_ext.models.checkpoint import load_sd_checkpoint
from lorakit_ext.models.ldm import LdmModel
from lorakit_ext.project import create_project
from lorakit_ext.train.loop import Trainer, TrainJob
from lorakit_ext.train_config import TrainConfig
from test_train import model_fingerprint

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SMALL = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, num_repeats=1, max_train_epochs=3, optimizer="AdamW",
             network_dim=4, unet_lr=1e-3, lr_scheduler="constant", keep_only_last_n_epochs=0, trigger="kat", network_dropout=0.1)


def _run(tiny_sd15_dir, project, tmp_path, name, sample: bool, **changes):
    sd_model, _ = load_sd_checkpoint(tiny_sd15_dir / "tiny-sd15.safetensors")
    sd_model.eval()
    before = model_fingerprint(sd_model)
    config = TrainConfig(**{**SMALL, **changes}).validate()
    job = TrainJob(config, project, tmp_path / name, project.runs / name, base_model_name="tiny-sd15")
    job.run_dir.mkdir(parents=True)
    model = LdmModel(sd_model, clip_skip=2)
    result = Trainer(model, job, sampler=headless_sampler(model, steps=3) if sample else None).run()
    assert model_fingerprint(sd_model) == before
    return result


def test_samples_every_two_epochs_after_the_last_and_every_n_steps_leave_the_training_alone(tiny_sd15_dir, tmp_path):
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)
    # 4 images in batches of 2: 2 steps an epoch, 6 in all.
    options = dict(sample_every_n_epochs=2, sample_every_n_steps=5, sample_prompt="kat, red hair\nkat, smile")
    plain = _run(tiny_sd15_dir, project, tmp_path, "plain", False, **options)
    sampled = _run(tiny_sd15_dir, project, tmp_path, "sampled", True, **options)
    assert sampled.losses == plain.losses and sampled.validation == plain.validation
    drawn = sorted(p.name for p in (sampled.run_dir / "samples").iterdir())
    assert drawn == ["kat-02-1.png", "kat-02-2.png", "kat-03-1.png", "kat-03-2.png", "kat-step00000005-1.png", "kat-step00000005-2.png"]
    assert Image.open(sampled.run_dir / "samples" / "kat-03-1.png").size == (64, 64)
    # The kohya pair reproduces the sampling: the same prompts at the same seeds, sizes and times.
    train = tomllib.loads((sampled.run_dir / "kohya_config.toml").read_text(encoding="utf-8"))["train"]
    assert (train["sample_every_n_epochs"], train["sample_every_n_steps"], train["sample_sampler"]) == (2, 5, "ddim")
    assert Path(train["sample_prompts"]) == (sampled.run_dir / "kohya_sample_prompts.txt").resolve()
    assert Path(train["sample_prompts"]).read_text(encoding="utf-8").splitlines() == [
        "kat, red hair --w 64 --h 64 --d 42 --s 20 --l 7", "kat, smile --w 64 --h 64 --d 43 --s 20 --l 7"]


def test_the_cli_draws_samples_every_n_steps_alone(tiny_sd15_dir, tmp_path, capsys):
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)
    options = ["--set=resolution=64", "--set=min_bucket_reso=64", "--set=max_bucket_reso=128", "--set=network_dim=4", "--set=optimizer=AdamW",
               "--repeats", "1", "--batch-size", "2", "--epochs", "2", "--set=sample_every_n_steps=3"]
    assert main(["train", "kat", "--root", str(project.root), "--base-model", str(tiny_sd15_dir / "tiny-sd15.safetensors"),
                 "--json", *options]) == 0
    run_dir = Path(json.loads(capsys.readouterr().out)["run_dir"])
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["kat-step00000003-1.png"]
    train = tomllib.loads((run_dir / "kohya_config.toml").read_text(encoding="utf-8"))["train"]
    assert train["sample_every_n_steps"] == 3 and "sample_every_n_epochs" not in train


def test_without_prompts_the_sample_shows_the_trigger_and_the_common_tags():
    captions = ["kat, red hair, smile", "kat, red hair, jacket", "kat, blue eyes, red hair"]
    assert typical_prompt(captions, "kat", tags=2) == "kat, red hair, blue eyes"
