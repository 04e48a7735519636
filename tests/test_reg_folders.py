"""Several image folders with their own repeats and regularisation images with prior_loss_weight,
counted, ordered, weighted and recorded as kohya sd-scripts does."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from tiny_datasets import fill_dataset
from tiny_runs import tiny_sd15_trainer

from lorakit_ext.dataset.folders import balance_reg_repeats, parse_folders
from lorakit_ext.errors import UserError
from lorakit_ext.export.writer import read_lora_metadata
from lorakit_ext.project import create_project
from lorakit_ext.train.data import EpochBatches, LatentCache
from lorakit_ext.train.loss import diffusion_loss
from lorakit_ext.train.plan import FolderCount, make_plan
from lorakit_ext.train.preflight import dataset_fingerprint, dataset_schedule
from lorakit_ext.train_config import TrainConfig, load_config_file

SMALL = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, validate_every_n_epochs=0)


def _project(tmp_path, images=4):
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset, images)
    return project


def test_folder_lines_give_repeats_by_count_by_kohya_name_and_by_parent(tmp_path):
    (tmp_path / "outfits").mkdir()
    (tmp_path / "5_kat_beach").mkdir()
    (tmp_path / "reg" / "1_woman").mkdir(parents=True)
    (tmp_path / "reg" / "2_man").mkdir()
    (tmp_path / "reg" / "notes").mkdir()  # not kohya-named: not a folder of images to kohya
    text = f"3 {tmp_path / 'outfits'}\n# a comment\n\n{tmp_path / '5_kat_beach'}\n"
    more = parse_folders(text, tmp_path)
    assert [(f.path.name, f.repeats, f.class_tokens, f.label) for f in more] == [
        ("outfits", 3, "", "3_outfits"), ("5_kat_beach", 5, "kat beach", "5_kat_beach")]
    reg = parse_folders("reg", tmp_path, regularisation=True)  # relative: inside the base folder
    assert [(f.path.name, f.repeats, f.regularisation, f.class_tokens) for f in reg] == [
        ("1_woman", 1, True, "woman"), ("2_man", 2, True, "man")]


@pytest.mark.parametrize("text, message", [
    ("3 missing", "is not a folder"),
    ("plain", "give its repeats"),
    ("0 plain", "at least 1"),
    ("2 plain\n3 plain", "named twice"),
])
def test_bad_folder_lines_are_refused_with_the_remedy(tmp_path, text, message):
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match=message):
        parse_folders(text, tmp_path)


def test_regularisation_repeats_are_balanced_as_kohya_does():
    # Fewer regularisation steps than training steps: every image gains a repeat in turn.
    assert balance_reg_repeats(10, [1, 1, 1]) == [4, 3, 3]
    # More: images are taken with their own repeats until the count is reached; the rest unused.
    assert balance_reg_repeats(5, [3, 3, 3]) == [3, 3, 0]
    assert balance_reg_repeats(6, [2, 2, 2]) == [2, 2, 2]
    assert balance_reg_repeats(0, [1, 1]) == [0, 0]
    assert balance_reg_repeats(5, []) == []


def test_the_plan_counts_every_folder_and_matches_regularisation_to_training():
    plan = make_plan(10, 10, 2, epochs=2, more=[FolderCount("3_outfits", 4, 3)], reg=[FolderCount("1_woman", 50, 1)],
                     prior_loss_weight=0.5)
    assert plan.lines[:4] == [
        "dataset: found 10 images with 10 repeats, equaling 100 steps.",
        "3_outfits: found 4 images with 3 repeats, equaling 12 steps.",
        "Regularisation 1_woman: 50 images with 1 repeats, equaling 50 steps.",
        "As kohya does, regularisation is matched to the 112 training steps: 112 regularisation steps per epoch, "
        "weighted 0.5; 224 steps in all.",
    ]
    assert plan.steps_per_epoch == 112 and plan.total_steps == 224 and plan.images == 14
    too_many = make_plan(2, 1, 1, more=[], reg=[FolderCount("1_woman", 5, 1)])
    assert too_many.warnings == ["3 of the 5 regularisation steps are not used (more than the training steps)"]


def _folders(tmp_path):
    outfits = tmp_path / "outfits"
    outfits.mkdir()
    fill_dataset(outfits, 2, trigger="kat outfit")
    reg = tmp_path / "regs" / "1_woman"
    reg.mkdir(parents=True)
    for path in fill_dataset(reg, 3, trigger="woman"):
        path.with_suffix(".txt").unlink()  # kohya captions these with the folder's class tokens
    return outfits, reg.parent


def test_the_schedule_holds_every_folder_with_its_repeats_and_the_balanced_regularisation(tmp_path):
    project = _project(tmp_path)
    outfits, regs = _folders(tmp_path)
    config = TrainConfig(**SMALL, num_repeats=2, dataset_folders=f"3 {outfits}", reg_folders=str(regs),
                         prior_loss_weight=0.25, train_batch_size=1).validate()
    data = dataset_schedule(config, project.dataset)
    train = [item for item in data.items if not item.regularisation]
    reg = [item for item in data.items if item.regularisation]
    assert [item.repeats for item in train] == [2, 2, 2, 2, 3, 3]
    # 14 training steps, three regularisation images of 1 repeat: 14 = 5 + 5 + 4.
    assert [item.repeats for item in reg] == [5, 5, 4]
    assert {item.caption for item in reg} == {"woman"}
    assert data.schedule.steps_per_epoch == 28
    assert [(f.label, n) for f, n in data.folders] == [("3_outfits", 2), ("1_woman", 3)]

    cache = LatentCache([torch.zeros(4, 8, 8) for _ in data.items])
    batches = EpochBatches.from_config(config, cache, data.items, data.buckets, epoch=0)
    seen, weights = Counter(), {}
    for batch in batches:
        for index, weight in zip(batch.indices, batch.loss_weights.tolist()):
            seen[index] += 1
            weights[index] = weight
    assert [seen[i] for i in range(len(data.items))] == [item.repeats for item in data.items]
    assert [weights[i] for i in range(len(data.items))] == [1.0] * 6 + [0.25] * 3


def test_without_regularisation_batches_carry_no_weights_and_a_changed_folder_changes_the_fingerprint(tmp_path):
    project = _project(tmp_path)
    outfits, _ = _folders(tmp_path)
    config = TrainConfig(**SMALL, dataset_folders=f"3 {outfits}").validate()
    data = dataset_schedule(config, project.dataset)
    cache = LatentCache([torch.zeros(4, 8, 8) for _ in data.items])
    assert all(batch.loss_weights is None for batch in EpochBatches.from_config(config, cache, data.items, data.buckets, 0))
    before = dataset_fingerprint(data.items)
    (outfits / "img0.txt").write_text("kat outfit, changed")
    assert dataset_fingerprint(dataset_schedule(config, project.dataset).items) != before


def test_the_projects_own_dataset_and_an_empty_folder_are_refused(tmp_path):
    project = _project(tmp_path)
    with pytest.raises(UserError, match="always trains"):
        dataset_schedule(TrainConfig(**SMALL, dataset_folders="2 dataset").validate(), project.dataset)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="regularisation folder .* has no images"):
        dataset_schedule(TrainConfig(**SMALL, reg_folders=f"1 {tmp_path / 'empty'}").validate(), project.dataset)


def test_prior_loss_weight_scales_each_images_loss():
    pred, target = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    target[1] *= 3.0
    snr = torch.ones(2)
    plain = diffusion_loss(pred, target, snr, 0.0, False)
    weighted = diffusion_loss(pred, target, snr, 0.0, False, weights=torch.tensor([1.0, 0.0]))
    assert plain.item() == pytest.approx((1 + 9) / 2)
    assert weighted.item() == pytest.approx(1 / 2)


def test_kohya_dataset_configs_with_several_subsets_become_folder_lines(tmp_path):
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(
        "[general]\nresolution = 512\n[[datasets]]\n"
        "[[datasets.subsets]]\nimage_dir = '/data/10_kat'\nnum_repeats = 10\n"
        "[[datasets.subsets]]\nimage_dir = '/data/outfits'\nnum_repeats = 3\n"
        "[[datasets.subsets]]\nimage_dir = '/data/1_woman'\nnum_repeats = 1\nis_reg = true\nclass_tokens = 'woman'\n")
    train = tmp_path / "train.toml"
    train.write_text(f"[train]\ndataset_config = '{dataset}'\nprior_loss_weight = 0.5\n")
    values = load_config_file(train)
    assert (values["num_repeats"], values["dataset_folders"], values["reg_folders"]) == (10, "3 /data/outfits", "1 /data/1_woman")
    config = TrainConfig.from_dict(values)
    assert config.prior_loss_weight == 0.5
    dataset.write_text(dataset.read_text() + "[[datasets.subsets]]\nimage_dir = '/data/x'\nkeep_tokens = 3\n")
    with pytest.raises(UserError, match="keep_tokens of its own"):
        load_config_file(train)
    assert TrainConfig.from_dict({"reg_data_dir": "/data/reg"}).reg_folders == "/data/reg"


def test_a_run_with_folders_and_regularisation_records_them_as_kohya(tiny_sd15_dir, tmp_path):
    project = _project(tmp_path)
    outfits, regs = _folders(tmp_path)
    config = TrainConfig(**SMALL, num_repeats=1, max_train_epochs=1, optimizer="AdamW", network_dim=4,
                         dataset_folders=f"2 {outfits}", reg_folders=str(regs), prior_loss_weight=0.5).validate()
    trainer = tiny_sd15_trainer(tiny_sd15_dir, project, config, tmp_path / "out")
    job = trainer.job
    result = trainer.run()
    # 4 + 2×2 = 8 training steps and 8 regularisation steps, batch 2 in two buckets of each kind.
    assert result.status == "finished" and result.steps == 8
    metadata = read_lora_metadata(result.files[0])
    assert json.loads(metadata["ss_dataset_dirs"]) == {"1_kat": {"n_repeats": 1, "img_count": 4},
                                                        "2_outfits": {"n_repeats": 2, "img_count": 2}}
    assert json.loads(metadata["ss_reg_dataset_dirs"]) == {"1_woman": {"n_repeats": 1, "img_count": 3}}
    assert (metadata["ss_num_train_images"], metadata["ss_num_reg_images"], metadata["ss_prior_loss_weight"]) == ("8", "3", "0.5")
    assert "woman" in json.loads(metadata["ss_tag_frequency"])["1_woman"]
    plan = (job.run_dir / "plan.txt").read_text()
    assert "2_outfits: found 2 images with 2 repeats, equaling 4 steps." in plan
    pair = load_config_file(job.run_dir / "kohya_config.toml")
    assert TrainConfig.from_dict(pair) == config
    assert "is_reg = true" in (job.run_dir / "kohya_dataset.toml").read_text()


def test_the_plan_command_takes_folders_and_refuses_a_bad_one(tmp_path, capsys):
    from lorakit_ext.cli import main

    project = _project(tmp_path)
    outfits, regs = _folders(tmp_path)
    root = ["--root", str(project.path.parent)]
    code = main(["plan", "kat", *root, "--repeats", "1", "--dataset-folder", f"2 {outfits}", "--reg-folder", str(regs),
                 "--prior-loss-weight", "0.5"])
    out = capsys.readouterr().out
    assert code == 0
    assert "2_outfits: found 2 images with 2 repeats, equaling 4 steps." in out
    assert "matched to the 8 training steps: 8 regularisation steps per epoch, weighted 0.5" in out
    assert main(["plan", "kat", *root, "--reg-folder", f"1 {tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: regularisation folder") and "is not a folder" in err


def test_validation_on_training_images_leaves_the_regularisation_images_out(tmp_path):
    from types import SimpleNamespace

    from lorakit_ext.train.loop import Trainer, TrainJob

    project = _project(tmp_path)  # 4 images: too few to hold any out
    _, regs = _folders(tmp_path)
    config = TrainConfig(**{**SMALL, "validate_every_n_epochs": 1}, reg_folders=str(regs)).validate()
    data = dataset_schedule(config, project.dataset)
    assert sum(item.regularisation for item in data.items) == 3 and not data.validation_items
    job = TrainJob(config, project, tmp_path / "out", project.runs / "run")
    trainer = Trainer(SimpleNamespace(device=torch.device("cpu")), job)
    validation = trainer._validation_set(data, LatentCache([torch.zeros(4, 8, 8) for _ in data.items]))
    assert validation.captions == [item.caption for item in data.items if not item.regularisation]
    assert "woman" not in validation.captions
