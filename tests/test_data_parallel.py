"""Data-parallel training (``train --gpus N``) on the CPU with gloo: two processes give the loss
curve and LoRA of one process training the doubled batch; rank 0 alone writes; a resume in another
number of processes is refused by every rank without a hang."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from tiny_datasets import fill_dataset

from lorakit_ext.cli import main
from lorakit_ext.export.writer import read_lora_metadata
from lorakit_ext.project import create_project
from lorakit_ext.train.data import Batch
from lorakit_ext.train.data_parallel import Rows, World, rank_share

REPO = Path(__file__).resolve().parents[1]
# Five images: two square, three tall. With repeats 2 and a total batch of 4 the tall bucket's
# second batch has 2 rows, so rank 1 gets none of it and runs a row that counts for nothing.
SETTINGS = ["--set=resolution=64", "--set=min_bucket_reso=64", "--set=max_bucket_reso=128", "--set=optimizer=AdamW",
            "--set=network_dim=4", "--set=lr_scheduler=constant", "--set=keep_only_last_n_epochs=0", "--set=unet_lr=1e-3",
            "--repeats", "2", "--epochs", "2", "--device", "cpu"]


def batch_of(rows: int, weights=None) -> Batch:
    return Batch(torch.arange(rows, dtype=torch.float32).view(rows, 1, 1, 1).expand(rows, 4, 2, 2), [f"c{i}" for i in range(rows)],
                 (64, 64), tuple(range(rows)), (False,) * rows, torch.zeros(rows, 6), weights)


def test_each_rank_takes_its_rows_and_the_weights_make_the_ranks_mean_the_batch_mean():
    full = batch_of(4)
    first, rows = rank_share(full, World(0, 2, 0, True), 2)
    assert rows == Rows(4, 0, 2) and first.captions == ["c0", "c1"] and first.loss_weights is None
    short = batch_of(3, torch.tensor([1.0, 1.0, 0.5]))
    one, rows0 = rank_share(short, World(0, 2, 0, True), 2)
    two, rows1 = rank_share(short, World(1, 2, 0, True), 2)
    assert (rows0, rows1) == (Rows(3, 0, 2), Rows(3, 2, 1))
    assert one.latents[:, 0, 0, 0].tolist() == [0.0, 1.0] and two.latents[:, 0, 0, 0].tolist() == [2.0]
    # Mean over ranks of each rank's weighted mean = the weighted mean over the whole batch.
    losses = torch.tensor([1.0, 2.0, 4.0])
    ranks_mean = ((one.loss_weights * losses[:2]).mean() + (two.loss_weights * losses[2:]).mean()) / 2
    assert ranks_mean.item() == pytest.approx((short.loss_weights * losses).mean().item())
    empty, rows_empty = rank_share(batch_of(2), World(1, 2, 0, True), 2)
    assert rows_empty == Rows(2, 0, 1) and empty.loss_weights.tolist() == [0.0]


def test_world_reads_torchrun_variables_and_refuses_nonsense():
    assert World.from_env({}) == World()
    assert World.from_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}) == World(1, 2, 1, True)
    with pytest.raises(Exception, match="RANK 3 is outside WORLD_SIZE 2"):
        World.from_env({"WORLD_SIZE": "2", "RANK": "3"})
    assert World(1, 2, 1, True).device("cpu") == "cpu"


def _project(root: Path, name: str):
    project = create_project(root, name)
    fill_dataset(project.dataset, count=5)
    return project


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "loss.csv", encoding="utf-8") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def _launch(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "lorakit_ext", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_two_gloo_processes_train_what_one_process_trains_with_the_doubled_batch(tmp_path, tiny_sd15_dir, capsys):
    model = str(tiny_sd15_dir / "tiny-sd15.safetensors")
    one = _project(tmp_path / "one", "kat")
    assert main(["train", "kat", "--root", str(one.root), "--base-model", model, "--batch-size", "4", *SETTINGS, "--json"]) == 0
    single = json.loads(capsys.readouterr().out)

    two = _project(tmp_path / "two", "kat")
    done = _launch(["train", "kat", "--root", str(two.root), "--base-model", model, "--batch-size", "2", "--gpus", "2", *SETTINGS, "--json"])
    assert done.returncode == 0, done.stderr[-3000:]
    parallel = json.loads(done.stdout)  # rank 0's result alone: the other rank prints nothing here
    assert parallel["steps"] == single["steps"] == 6  # (4 + 6 rows) / 4 → 1 + 2 batches per epoch, 2 epochs

    a, b = _losses(Path(single["run_dir"])), _losses(Path(parallel["run_dir"]))
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, abs=1e-5)
    assert a[0] != pytest.approx(a[-1], abs=1e-5)  # it trained
    for file_a, file_b in zip(single["files"], parallel["files"]):
        weights_a, weights_b = safetensors.torch.load_file(file_a), safetensors.torch.load_file(file_b)
        assert weights_a.keys() == weights_b.keys()
        for key in weights_a:
            # The files hold fp16: a float-order difference may round one step apart.
            torch.testing.assert_close(weights_b[key].float(), weights_a[key].float(), atol=5e-5, rtol=1e-3)
        assert any(w.abs().max() > 0 for key, w in weights_a.items() if "lora_up" in key)  # up weights start at 0
    metadata = read_lora_metadata(Path(parallel["files"][-1]))
    assert metadata["ss_batch_size_per_device"] == "2" and metadata["ss_total_batch_size"] == "4"

    run = json.loads((Path(parallel["run_dir"]) / "run.json").read_text(encoding="utf-8"))
    assert run["options"]["processes"] == 2 and run["status"] == "finished"
    assert "On 2 GPUs: batch size 2 per GPU, 4 images per step in total." in (Path(parallel["run_dir"]) / "plan.txt").read_text()
    # Rank 0 alone wrote: one run folder, one set of epoch files, no lock left behind.
    assert len(list(two.runs.iterdir())) == 1
    assert sorted(p.name for p in (two.path / "output").iterdir()) == ["kat-01.safetensors", "kat-02.safetensors"]
    assert not (two.path / ".lorakit.lock").exists()


def test_a_resume_in_another_number_of_processes_is_refused_by_every_rank(tmp_path, tiny_sd15_dir, monkeypatch, capsys):
    from lorakit_ext.train.loop import Trainer

    project = _project(tmp_path, "kat")
    calls = {"n": 0}
    report = Trainer._report

    def stop_after_two(self, *args, **kwargs):
        report(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            self.should_stop = lambda: True

    monkeypatch.setattr(Trainer, "_report", stop_after_two)
    args = ["train", "kat", "--root", str(project.root), "--base-model", str(tiny_sd15_dir / "tiny-sd15.safetensors"),
            "--batch-size", "2", *SETTINGS]
    assert main([*args, "--json"]) == 130
    resume = json.loads(capsys.readouterr().out)["resume"].split()[3:]
    done = _launch([*resume, "--gpus", "2"])
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "trained in 1 data-parallel process(es), this resume in 2" in errors[0]
    assert "resume it with one process (no --gpus)" in errors[0]
