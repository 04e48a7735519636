"""Whole headless runs on SD2 checkpoints, ε (SD2-512) and v (SD2-768-v): the CLI trains them from
the file and its .yaml, and the epoch files and the kohya TOML say which SD2 they are for."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tiny_datasets import fill_dataset
from tiny_sd2 import build_tiny_sd2

from lorakit_ext.cli import main
from lorakit_ext.export.writer import read_lora_file
from lorakit_ext.project import create_project
from lorakit_ext.train_config import load_config_file

SMALL = ["--set=resolution=64", "--set=min_bucket_reso=64", "--set=max_bucket_reso=128", "--set=optimizer=AdamW",
         "--set=network_dim=4", "--set=lr_scheduler=constant", "--set=clip_skip=1",
         "--repeats", "1", "--batch-size", "2", "--epochs", "2"]


@pytest.mark.parametrize("v, architecture", [(False, "stable-diffusion-v2-512/lora"), (True, "stable-diffusion-v2-768-v/lora")])
def test_an_sd2_run_trains_and_its_files_say_which_sd2(tmp_path, capsys, v, architecture):
    checkpoint = build_tiny_sd2(tmp_path / "model", v=v, trainable=True)
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)
    assert main(["train", "kat", "--root", str(project.root), "--base-model", str(checkpoint), "--json", *SMALL]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [Path(f).name for f in out["files"]] == ["kat-01.safetensors", "kat-02.safetensors"]
    tensors, metadata = read_lora_file(out["files"][-1])
    assert metadata["ss_v2"] == "True" and metadata["ss_base_model_version"] == "sd_v2"
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["modelspec.prediction_type"] == ("v" if v else "epsilon")
    assert any(k.startswith("lora_te_") for k in tensors) and any(k.startswith("lora_unet_") for k in tensors)
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert any(t.abs().max() > 0 for t in ups)  # trained: up weights start at zero
    # OpenCLIP's attention trains too (in weight space: its MHA reads the packed q/k/v weight).
    assert tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"].abs().max() > 0
    losses = [float(line.split(",")[1]) for line in (Path(out["run_dir"]) / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    kohya = load_config_file(Path(out["run_dir"]) / "kohya_config.toml")
    assert kohya["v2"] is True and kohya.get("v_parameterization", False) is v
