"""``bench train --kohya-sd-scripts DIR``: kohya sd-scripts' own training script of the model family
(``train_network.py`` for SD1.5, ``sdxl_train_network.py`` for SDXL) run on this machine at the
settings of our rows, just before them, so one report compares both.

For each (train, batch, gradient checkpointing) row kohya trains, unchanged, on
- a random-initialised full-size checkpoint of the family in the A1111 single-file layout, built by
  LoRA Kit's own model builder (throughput does not depend on weight values), with the family's real
  CLIP tokenizers built offline in the folders sd-scripts looks in first
  (:mod:`lorakit_ext.bench.models` says which, per family);
- the very dataset files our rows train on;
- our row's ``TrainConfig`` exported by :mod:`lorakit_ext.export.kohya_toml`, the same TOML pair
  every LoRA Kit run leaves in its run folder, plus the benchmark's tokenizer and loader options.

It runs in its own process, with the Python that has sd-scripts' packages (``--kohya-python``),
while this process has not touched the GPU yet, so the nvidia-smi peak is kohya's alone.
:mod:`lorakit_ext.bench.kohya_clock` records when each of kohya's steps ended; the steady-state
rate skips the same warm-up steps as ours.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lorakit_ext.bench.models import BenchFamily
from lorakit_ext.bench.smi import SmiPeak
from lorakit_ext.errors import UserError
from lorakit_ext.export.kohya_toml import dataset_toml, render_train_table, training_args
from lorakit_ext.fsutil import atomic_write_json
from lorakit_ext.models.clip_tokenizer import build_clip_tokenizer_files

CLOCK = Path(__file__).with_name("kohya_clock.py")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def row_name(train: str, batch: int, checkpointing: bool) -> str:
    return f"{'te_unet' if train == 'te' else 'unet'}_b{batch}{'_gc' if checkpointing else ''}"


def write_tokenizers(folder: Path, family: BenchFamily) -> Path:
    """The family's tokenizers, each in the folder under ``folder`` that sd-scripts reads it from."""
    for tokenizer in family.tokenizers:
        files = build_clip_tokenizer_files(folder / tokenizer.folder)
        if tokenizer.pad_token is not None:
            config = files / "tokenizer_config.json"
            atomic_write_json(config, {**json.loads(config.read_text(encoding="utf-8")), "pad_token": tokenizer.pad_token})
    return folder


def _check_inputs(sd_scripts: str, python: str, script: str) -> tuple[Path, str]:
    folder = Path(sd_scripts).resolve()
    if not (folder / script).is_file():
        raise UserError(f"--kohya-sd-scripts: {sd_scripts} has no {script} (expected a kohya-ss/sd-scripts checkout)")
    exe = shutil.which(python)
    if exe is None:
        raise UserError(f"--kohya-python: {python} is not an executable Python")
    # Absolute, as it runs from sd-scripts' folder; not resolved, or a venv's python link would
    # start the base interpreter without the venv's packages.
    return folder, os.path.abspath(exe)


def _kohya_config(config, work: Path, dataset_dir: Path, checkpoint: Path, tokenizers: Path, precision: str) -> Path:
    total = config.max_train_steps
    (work / "dataset.toml").write_text(dataset_toml(config, dataset_dir), encoding="utf-8")
    args = training_args(
        config, base_model_path=str(checkpoint), dataset_config=str(work / "dataset.toml"), output_dir=str(work / "out"),
        output_name=work.name, total_steps=total, warmup_steps=int(total * config.lr_warmup_ratio),
        v_parameterization=False, v2=False, mixed_precision=precision, optimizer=config.optimizer,
    )
    # A few persistent workers: with cached latents a worker only hands out tensors, and workers
    # respawned mid-run would count as training time.
    args.update(tokenizer_cache_dir=str(tokenizers), max_data_loader_n_workers=2, persistent_data_loader_workers=True)
    path = work / "config.toml"
    path.write_text(render_train_table(args), encoding="utf-8")
    return path


def _record(name: str, batch: int, clock: dict, skip: int, smi_peak_mib: float | None) -> dict:
    ends = clock["step_end_s"]
    record = {
        "kind": "kohya", "name": name, "batch": batch, "steps": len(ends), "skip_steps": skip,
        "it_s": (len(ends) - skip) / (ends[-1] - ends[skip - 1]),
        "first_step_s": ends[0],  # from the start of kohya's process: imports, model load, latent caching
    }
    record["img_s"] = record["it_s"] * batch
    for key in ("max_memory_allocated_GiB", "max_memory_reserved_GiB"):
        if key in clock:
            record[f"torch_{key}"] = clock[key]
    if smi_peak_mib is not None:
        record["smi_peak_mem_MiB"] = smi_peak_mib
    return record


def kohya_rows(sd_scripts: str, python: str, configs: dict, dataset_dir: Path, *, family: BenchFamily, precision: str,
               warmup: int) -> tuple[dict, list[str]]:
    """Runs the family's sd-scripts script once per ``(train, batch, checkpointing): TrainConfig`` of
    ``configs`` (each with ``max_train_steps`` set) on the images in ``dataset_dir``; returns their
    records and notes on the rows that gave none."""
    script = family.family.kohya_script
    folder, exe = _check_inputs(sd_scripts, python, script)
    rows, notes = {}, []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="lorakit-kohya-") as tmp:
        tmp = Path(tmp)
        print(f"kohya sd-scripts: writing a random-weight {family.label} checkpoint", file=sys.stderr, flush=True)
        checkpoint = family.write_checkpoint(tmp / f"{family.name}-random.safetensors")
        tokenizers = write_tokenizers(tmp / "tokenizers", family)
        for (train, batch, checkpointing), config in configs.items():
            name = row_name(train, batch, checkpointing)
            work = tmp / name
            work.mkdir()
            clock, log = work / "clock.json", work / "kohya.log"
            kohya_config = _kohya_config(config, work, dataset_dir, checkpoint, tokenizers, precision)
            command = [exe, str(CLOCK), str(folder / script), str(clock), "--config_file", str(kohya_config)]
            print(f"kohya sd-scripts: {script} {name}, {config.max_train_steps} steps", file=sys.stderr, flush=True)
            with open(log, "w", encoding="utf-8") as out, SmiPeak(device) as smi:
                done = subprocess.run(command, cwd=folder, env={**os.environ, **OFFLINE, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT)
            steps = json.loads(clock.read_text(encoding="utf-8")) if clock.exists() else {"step_end_s": []}
            if done.returncode == 0 and len(steps["step_end_s"]) > warmup:
                rows[(train, batch, checkpointing)] = _record(name, batch, steps, warmup, smi.peak_mib)
            else:
                tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
                notes.append(f"kohya {name} gave no result (exit {done.returncode}, {len(steps['step_end_s'])} steps); its log ends:\n{tail}")
    return rows, notes
