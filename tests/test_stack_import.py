"""A headless run imports bitsandbytes only when its optimiser is bitsandbytes' own: peft would import
it (seconds) for quantised layers LoRA Kit never trains. Each run is a fresh ``python -m lorakit_ext
train`` beside a stand-in bitsandbytes that leaves a mark when imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from tiny_datasets import fill_dataset

from lorakit_ext.project import create_project

REPO = Path(__file__).resolve().parents[1]

# A stand-in with bitsandbytes' optimiser name: torch's AdamW under another class name.
STAND_IN = """
import os
from pathlib import Path
Path(os.environ["BNB_MARK"]).write_text("imported")
"""
STAND_IN_OPTIM = """
import torch
class AdamW8bit(torch.optim.AdamW):
    pass
"""


@pytest.fixture
def bnb_site(tmp_path):
    package = tmp_path / "site" / "bitsandbytes"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(STAND_IN)
    (package / "optim.py").write_text(STAND_IN_OPTIM)
    return package.parent


def _train(tmp_path, checkpoint, site, optimizer):
    project = create_project(tmp_path / optimizer, "kat")
    fill_dataset(project.dataset, count=2)
    mark = tmp_path / f"{optimizer}.mark"
    env = {**os.environ, "BNB_MARK": str(mark), "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = ["train", "kat", "--root", str(project.root), "--base-model", str(checkpoint), "--device", "cpu",
            "--set=resolution=64", "--set=min_bucket_reso=64", "--set=max_bucket_reso=64", f"--set=optimizer={optimizer}",
            "--set=network_dim=4", "--repeats", "1", "--batch-size", "2", "--epochs", "1", "--set=validation_split=0"]
    done = subprocess.run([sys.executable, "-m", "lorakit_ext", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [lora] = (project.path / "output").glob("*.safetensors")
    with safe_open(str(lora), "pt") as f:
        return mark.exists(), f.metadata()["ss_optimizer"]


def test_a_run_whose_optimiser_is_not_bitsandbytes_never_imports_it(tmp_path, tiny_sd15_dir, bnb_site):
    imported, optimizer = _train(tmp_path, tiny_sd15_dir / "tiny-sd15.safetensors", bnb_site, "AdamW")
    assert optimizer.endswith("AdamW") and not imported


def test_an_eager_adamw8bit_still_trains_with_bitsandbytes(tmp_path, tiny_sd15_dir, bnb_site):
    # On the CPU the steps are eager, so AdamW8bit is bitsandbytes' own class.
    imported, optimizer = _train(tmp_path, tiny_sd15_dir / "tiny-sd15.safetensors", bnb_site, "AdamW8bit")
    assert imported and "AdamW8bit" in optimizer
