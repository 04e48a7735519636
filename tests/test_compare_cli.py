"""``train`` reports each epoch's validation loss and a suggestion; ``compare`` draws the run's
grid headless, measures every epoch and marks the suggested one; both keep ``epochs.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from tiny_datasets import fill_dataset

from lorakit_ext.cli import main
from lorakit_ext.project import create_project

SMALL = ["--set=resolution=64", "--set=min_bucket_reso=64", "--set=max_bucket_reso=128", "--set=optimizer=AdamW",
         "--set=network_dim=4", "--set=lr_scheduler=constant", "--repeats", "1", "--batch-size", "2", "--epochs", "3"]


@pytest.fixture
def trained(tmp_path, tiny_sd15_dir, capsys):
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)
    checkpoint = tiny_sd15_dir / "tiny-sd15.safetensors"
    assert main(["train", "kat", "--root", str(project.root), "--base-model", str(checkpoint), "--json", *SMALL]) == 0
    return project, json.loads(capsys.readouterr().out)


def test_train_prints_each_epochs_validation_loss_and_suggests_the_lowest(trained):
    project, out = trained
    losses = {row["label"]: row["validation_loss"] for row in out["epochs"]}
    assert list(losses) == ["kat-01", "kat-02", "kat-03"] and all(v > 0 for v in losses.values())
    best = min(losses, key=losses.get)
    assert out["suggestion"]["label"] == best and "not checked (no grid)" in out["suggestion"]["reason"]
    saved = json.loads((Path(out["run_dir"]) / "epochs.json").read_text())
    assert saved["suggestion"] == out["suggestion"] and saved["grid_measured"] is False
    # Where the start-up went, in the output and the run record.
    record = json.loads((Path(out["run_dir"]) / "run.json").read_text())
    # What each epoch's end took (the time between one epoch's last step and the next one's first).
    assert [end["epoch"] for end in record["epoch_end_s"]] == [1, 2, 3]
    assert all(set(end) == {"epoch", "validation", "files_and_samples", "resume_state"} and end["validation"] > 0
               for end in record["epoch_end_s"])
    recorded = record["phases_s"]
    assert list(recorded)[:6] == ["imports", "checks", "read_checkpoint", "build_model", "weights_to_device", "wait_for_hashes"]
    assert recorded == out["phases_s"]
    assert {"latents", "network", "to_first_step"} <= set(recorded)
    assert recorded["to_first_step"] >= recorded["latents"] >= 0 and recorded["checks"] > 0


def test_compare_measures_every_epoch_and_marks_the_suggestion_on_the_grid(trained, capsys):
    project, out = trained
    args = ["compare", "kat", "--root", str(project.root), "--size", "64", "--steps", "3", "--seeds", "1,2"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run"] == out["run"] and report["grid_measured"] is True
    for row in report["epochs"]:
        assert row["effect"] >= 0 and row["likeness"] is not None and isinstance(row["flags"], list)
        assert len(row["reasons"]) == len(row["flags"])
    grid = Image.open(report["grid"])
    assert grid.size[1] == 20 + 2 * 64  # the label bar and two seeds
    assert json.loads((Path(out["run_dir"]) / "epochs.json").read_text())["grid_measured"] is True
    # Text output: the table, the suggestion (or why there is none) and where things went.
    assert main(args + ["--no-grid"]) == 0
    text = capsys.readouterr().out
    assert "validation" in text.splitlines()[0] and "suggest" in text and "report:" in text
    # --no-grid keeps the measured report rather than replacing it with a poorer one.
    assert json.loads((Path(out["run_dir"]) / "epochs.json").read_text())["grid_measured"] is True


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "one"], "--seeds"),
    (["--run", "no-such-run"], "no run 'no-such-run'"),
])
def test_compare_refuses_bad_input_with_one_error_line(trained, capsys, extra, message):
    project, _ = trained
    assert main(["compare", "kat", "--root", str(project.root), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and message in err


def test_compare_without_a_finished_run_says_to_train_first(tmp_path, capsys):
    project = create_project(tmp_path / "projects", "kat")
    assert main(["compare", "kat", "--root", str(project.root)]) == 2
    assert "no finished run to compare; train one first" in capsys.readouterr().err


def test_the_headless_sampler_takes_exactly_the_steps_asked_within_the_schedule():
    from lorakit_ext.compare.sample import ddim_timesteps

    assert ddim_timesteps(3) == [667, 334, 1]  # ldm's own list would end at 1000, past the last index
    assert len(ddim_timesteps(20)) == 20 and ddim_timesteps(20)[0] == 951
