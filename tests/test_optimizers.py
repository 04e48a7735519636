"""Optimisers as their users expect: each one that is installed takes real steps with its
``optimizer_args``; a missing one is refused before training with the command that installs it;
AdamW8bit without bitsandbytes says it trains with AdamW and records that."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_datasets import fill_dataset

from lorakit_ext.errors import UserError
from lorakit_ext.export.kohya_toml import training_args
from lorakit_ext.export.writer import read_lora_metadata
from lorakit_ext.models.checkpoint import load_sd_checkpoint
from lorakit_ext.models.ldm import LdmModel
from lorakit_ext.optimizer_options import PACKAGES, parse_optimizer_args
from lorakit_ext.project import create_project
from lorakit_ext.train import optim
from lorakit_ext.train.loop import Trainer, TrainJob
from lorakit_ext.train.optim import build_optimizer, build_scheduler, check_optimizer
from lorakit_ext.train_config import OPTIMIZERS, TrainConfig

CPU = torch.device("cpu")

# What a user of each would set (kohya-colab's recommendations for the adaptive ones); the fixed
# rates are high enough for a few dozen steps on a toy problem to show.
SETTINGS = {
    "AdamW8bit": {"unet_lr": 1e-2, "text_encoder_lr": 1e-2},
    "AdamW": {"unet_lr": 1e-2, "text_encoder_lr": 1e-2},
    "Lion": {"unet_lr": 3e-3, "text_encoder_lr": 3e-3},
    "Prodigy": {"unet_lr": 1.0, "text_encoder_lr": 1.0, "optimizer_args": "decouple=True weight_decay=0.01 d_coef=2 use_bias_correction=True safeguard_warmup=True"},
    "DAdaptAdam": {"unet_lr": 1.0, "text_encoder_lr": 1.0, "optimizer_args": "decouple=True"},
    "Adafactor": {"optimizer_args": "relative_step=True scale_parameter=True warmup_init=False"},
}


def _installed(name: str) -> bool:
    if name not in PACKAGES:
        return True
    try:
        optim._optional_class(name)
        return True
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_installed_optimizer_takes_real_steps_that_lower_the_loss(name):
    if not _installed(name):
        pytest.skip(f"{PACKAGES[name][2]} is not installed")
    config = TrainConfig(optimizer=name, lr_scheduler="constant", **SETTINGS[name]).validate()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    target = torch.randn(64, 8)
    inputs = torch.randn(64, 8)
    groups = [{"params": [model.weight], "lr": config.unet_lr}, {"params": [model.bias], "lr": config.text_encoder_lr}]
    optimizer, choice = build_optimizer(config, groups, torch.device("cpu"))
    scheduler = build_scheduler(config, optimizer, total_steps=40, warmup_steps=0)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = (model(inputs) - target).square().mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    assert choice.name == name and choice.note is None
    assert losses[-1] < 0.9 * losses[0], losses[::8]


def test_a_missing_optimizer_is_refused_with_the_command_that_installs_it(monkeypatch):
    monkeypatch.setitem(PACKAGES, "Lion", ("lorakit_no_such_module", "Lion", "lion-pytorch"))
    with pytest.raises(UserError) as caught:
        check_optimizer(TrainConfig(optimizer="Lion"), CPU)
    message = str(caught.value)
    assert "pip install lion-pytorch" in message and "LORAKIT_INSTALL_OPTIMIZERS=1" in message and "or choose AdamW" in message


def test_adamw8bit_without_bitsandbytes_says_it_trains_with_adamw(monkeypatch):
    monkeypatch.setitem(PACKAGES, "AdamW8bit", ("lorakit_no_such_module", "AdamW8bit", "bitsandbytes"))
    choice = check_optimizer(TrainConfig(optimizer="AdamW8bit"), CPU)
    assert choice.name == "AdamW" and "training with torch AdamW instead" in choice.note and "pip install bitsandbytes" in choice.note


def test_the_check_before_a_captured_run_leaves_bitsandbytes_unimported(monkeypatch):
    # The run on CUDA trains AdamW8bit as torch's AdamW: its check neither imports bitsandbytes
    # (seconds of start-up) nor, where it is missing, says it falls back.
    monkeypatch.setitem(PACKAGES, "AdamW8bit", ("lorakit_no_such_module", "AdamW8bit", "bitsandbytes"))
    choice = check_optimizer(TrainConfig(optimizer="AdamW8bit"), torch.device("cuda"))
    assert choice.name == "AdamW" and "replays as a CUDA graph" in choice.note and "instead" not in choice.note
    with pytest.raises(UserError, match="AdamW refuses these arguments"):
        check_optimizer(TrainConfig(optimizer="AdamW8bit", optimizer_args="eps=-1"), torch.device("cuda"))


@pytest.mark.parametrize("changes, message", [
    ({"optimizer_args": "d_coef"}, "'d_coef' is not key=value"),
    ({"optimizer": "Prodigy"}, "Prodigy finds its own step size and expects learning rates near 1.0, not 0.0005"),
])
def test_settings_that_cannot_work_are_refused_by_validation(changes, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**changes).validate()


def test_an_argument_the_optimizer_does_not_take_is_refused_before_training():
    with pytest.raises(UserError, match="AdamW refuses these arguments .*check optimizer_args"):
        check_optimizer(TrainConfig(optimizer="AdamW", optimizer_args="d_coef=2"), CPU)


def test_optimizer_args_read_as_sd_scripts_reads_them_and_go_into_the_kohya_toml():
    assert parse_optimizer_args("decouple=True d_coef=2 betas=0.9,0.999 mode=fast") == {
        "decouple": True, "d_coef": 2, "betas": (0.9, 0.999), "mode": "fast"}
    # A kohya TOML holds them as a list; from_dict takes that too.
    config = TrainConfig.from_dict({"optimizer": "Prodigy", "unet_lr": 1.0, "text_encoder_lr": 1.0,
                                    "optimizer_args": ["decouple=True", "d_coef=2"]})
    args = training_args(config, base_model_path="", dataset_config="d.toml", output_dir="out", output_name="kat",
                         total_steps=10, warmup_steps=0, v_parameterization=False, v2=False, mixed_precision="bf16",
                         optimizer=config.optimizer)
    assert args["optimizer_args"] == ["weight_decay=0.1", "betas=(0.9,0.99)", "decouple=True", "d_coef=2"]
    adafactor = TrainConfig(optimizer="Adafactor", optimizer_args="relative_step=True scale_parameter=True warmup_init=True")
    args = training_args(adafactor, base_model_path="", dataset_config="d.toml", output_dir="out", output_name="kat",
                         total_steps=10, warmup_steps=0, v_parameterization=False, v2=False, mixed_precision="bf16",
                         optimizer="Adafactor")
    assert args["lr_scheduler"] == "adafactor:0.0005" and "relative_step=True" in args["optimizer_args"]


@pytest.mark.skipif(importlib.util.find_spec("prodigyopt") is None, reason="prodigyopt is not installed")
def test_a_prodigy_run_trains_and_its_files_say_prodigy(tiny_sd15_dir, tmp_path):
    project = create_project(tmp_path / "projects", "kat")
    fill_dataset(project.dataset)
    sd_model, _ = load_sd_checkpoint(tiny_sd15_dir / "tiny-sd15.safetensors")
    config = TrainConfig(resolution=64, min_bucket_reso=64, max_bucket_reso=128, num_repeats=1, train_batch_size=2,
                         max_train_epochs=1, network_dim=4, optimizer="Prodigy", validate_every_n_epochs=0,
                         **SETTINGS["Prodigy"]).validate()
    job = TrainJob(config, project, tmp_path / "out", project.runs / "run", base_model_name="tiny-sd15")
    job.run_dir.mkdir(parents=True)
    result = Trainer(LdmModel(sd_model.eval(), clip_skip=2), job).run()
    assert result.steps == 2 and read_lora_metadata(result.files[-1])["ss_optimizer"] == "Prodigy"


def test_adamw8bit_trains_as_fused_adamw_where_the_step_is_captured_and_says_why(monkeypatch):
    from lorakit_ext.train.optim import choose_optimizer

    # bitsandbytes present: without capture it runs as asked.
    monkeypatch.setitem(PACKAGES, "AdamW8bit", ("torch.optim", "SGD", "bitsandbytes"))
    assert choose_optimizer("AdamW8bit").cls is torch.optim.SGD
    choice = choose_optimizer("AdamW8bit", captured=True, kwargs={"weight_decay": 0.01, "betas": (0.9, 0.999)},
                              parameters=2**20)
    assert choice.name == "AdamW" and choice.cls is torch.optim.AdamW
    assert "6 MiB more" in choice.note and "set cuda_graphs off" in choice.note
    # An argument only bitsandbytes takes keeps bitsandbytes (and the step eager).
    assert choose_optimizer("AdamW8bit", captured=True, kwargs={"percentile_clipping": 95}).cls is torch.optim.SGD


@pytest.mark.parametrize("changes, device, captured", [
    ({}, "cuda", True), ({"cuda_graphs": False}, "cuda", False), ({}, "cpu", False),
    ({"multires_noise_iterations": 6}, "cuda", False),
])
def test_the_run_swaps_adamw8bit_only_where_its_steps_would_be_captured(monkeypatch, changes, device, captured):
    from lorakit_ext.train import optim

    seen = {}

    def choose(name, **kwargs):
        seen.update(kwargs)
        return optim.OptimizerChoice("AdamW", torch.optim.AdamW)

    monkeypatch.setattr(optim, "choose_optimizer", choose)
    param = torch.nn.Parameter(torch.zeros(4, 3))
    optim.build_optimizer(TrainConfig(**changes), [{"params": [param], "lr": 1e-4}], torch.device(device))
    assert seen["captured"] is captured and seen["parameters"] == 12
