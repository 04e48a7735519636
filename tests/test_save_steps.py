"""Saving every N optimizer steps (kohya's ``save_every_n_steps``): the step files are written as
kohya names them, with their own metadata, and count as the run's own when the next run picks a name."""

from __future__ import annotations

from tiny_datasets import fill_dataset
from tiny_runs import tiny_sd15_trainer

from lorakit_ext.export.writer import read_lora_metadata
from lorakit_ext.project import create_project
from lorakit_ext.train.preflight import free_output_stem
from lorakit_ext.train_config import TrainConfig


def test_step_files_are_written_every_n_steps_and_keep_their_names_free(tiny_sd15_dir, tmp_path):
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)
    config = TrainConfig(resolution=64, min_bucket_reso=64, max_bucket_reso=128, num_repeats=1, max_train_epochs=3,
                         optimizer="AdamW", network_dim=4, save_every_n_steps=3, validate_every_n_epochs=0,
                         keep_only_last_n_epochs=0).validate()
    result = tiny_sd15_trainer(tiny_sd15_dir, project, config, tmp_path / "out").run()
    names = sorted(p.name for p in result.files)
    # 4 images, batch 2: 2 steps an epoch, 6 in all; step files at 3 and 6 beside the 3 epochs.
    assert names == ["kat-01.safetensors", "kat-02.safetensors", "kat-03.safetensors",
                     "kat-step00000003.safetensors", "kat-step00000006.safetensors"]
    metadata = read_lora_metadata(tmp_path / "out" / "kat-step00000003.safetensors")
    assert (metadata["ss_output_name"], metadata["ss_steps"], metadata["ss_epoch"]) == ("kat-step00000003", "3", "2")
    for path in (tmp_path / "out").glob("kat-0*.safetensors"):
        path.unlink()
    assert free_output_stem(tmp_path / "out", "kat") == "kat-v2"  # the step files alone keep the name taken
