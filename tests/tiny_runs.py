"""A training run on the tiny SD1.5 model, set up the one way the run tests need it."""

from __future__ import annotations

from pathlib import Path

from lorakit_ext.models.checkpoint import load_sd_checkpoint
from lorakit_ext.models.ldm import LdmModel
from lorakit_ext.train.loop import Trainer, TrainJob


def tiny_sd15_trainer(tiny_sd15_dir: Path, project, config, out_dir: Path, name: str = "run", **trainer_options) -> Trainer:
    """A :class:`Trainer` of ``config`` on a freshly loaded tiny SD1.5 (eval mode, the config's
    clip skip and token length), writing epochs to ``out_dir`` and its record to ``runs/<name>``."""
    sd_model, _ = load_sd_checkpoint(Path(tiny_sd15_dir) / "tiny-sd15.safetensors")
    job = TrainJob(config, project, Path(out_dir), project.runs / name, base_model_name="tiny-sd15")
    job.run_dir.mkdir(parents=True, exist_ok=True)
    model = LdmModel(sd_model.eval(), clip_skip=config.clip_skip, max_token_length=config.max_token_length)
    return Trainer(model, job, **trainer_options)
