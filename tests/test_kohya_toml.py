"""``kohya_config.toml`` + ``kohya_dataset.toml``: runnable by kohya sd-scripts as written.

Every key is checked against what sd-scripts 48d368f's ``train_network.py`` accepts
(``sd_scripts_options``, this project's record of its argparse options and dataset schema). With an
sd-scripts checkout at hand, ``LORAKIT_SD_SCRIPTS=<its folder>`` (and
``LORAKIT_SD_SCRIPTS_PYTHON=<a Python that can import it>``) also runs its own loader on the files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sd_scripts_options import (
    DATASET_KEYS,
    DREAMBOOTH_SUBSET_KEYS,
    GENERAL_KEYS,
    SUBSET_REQUIRED,
    TRAIN_CHOICES,
    TRAIN_OPTIONS,
    has_type,
)

from lorakit_ext.export.kohya_toml import MODEL_PLACEHOLDER, dataset_toml, training_toml
from lorakit_ext.train_config import TrainConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

CONFIGS = {
    "LoRA": ({}, {}),
    "LoCon": ({"network_type": "LoCon", "conv_dim": 8, "conv_alpha": 4.0}, {}),
    "UNet only": ({"text_encoder_lr": 0.0, "train_batch_size": 8}, {}),
    "SD2 v-param": ({"resolution": 768, "max_bucket_reso": 1024}, {"v2": True, "v_parameterization": True, "mixed_precision": "fp16"}),
    "SD2 512": ({}, {"v2": True, "mixed_precision": "no"}),
    "max_train_steps": ({"max_train_steps": 500}, {"total_steps": 500, "warmup_steps": 25}),
    "extras": ({"noise_offset": 0.05, "network_dropout": 0.1, "training_comment": "first try", "trigger": "kat3r1na",
                "caption_dropout_rate": 0.05, "flip_aug": True, "bucket_no_upscale": True, "gradient_checkpointing": True}, {}),
    "polynomial": ({"lr_scheduler": "polynomial", "lr_scheduler_num_cycles": 2}, {}),
    "constant": ({"lr_scheduler": "constant"}, {}),
    "Adafactor": ({"optimizer": "Adafactor"}, {}),
    "75 tokens, off switches": ({"max_token_length": 75, "min_snr_gamma": 0.0, "keep_only_last_n_epochs": 0,
                                 "cache_latents": False, "enable_bucket": False}, {}),
    # Whole numbers where floats belong (a config built in code): still floats in the file.
    "int-valued floats": ({"network_alpha": 8, "unet_lr": 1, "max_grad_norm": 0}, {}),
    "in-memory model": ({}, {"base_model_path": ""}),
    "samples": ({"sample_every_n_epochs": 2, "sample_every_n_steps": 50}, {"sample_prompts": "run/kohya_sample_prompts.txt"}),
}


def write_pair(tmp_path: Path, name: str) -> tuple[dict, dict, str, TrainConfig]:
    overrides, call = CONFIGS[name]
    config = TrainConfig(**overrides)
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "dataset").mkdir(exist_ok=True)
    model = tmp_path / "models" / "base.safetensors"
    model.write_bytes(b"")
    kwargs = dict(
        base_model_path=str(model), dataset_config=str(tmp_path / "kohya_dataset.toml"), output_dir=str(tmp_path / "Lora"),
        output_name="kat", total_steps=630, warmup_steps=31, v_parameterization=False, v2=False,
        mixed_precision="bf16", optimizer=config.optimizer,
    )
    kwargs.update(call)
    text = training_toml(config, **kwargs)
    (tmp_path / "kohya_config.toml").write_text(text, encoding="utf-8")
    (tmp_path / "kohya_dataset.toml").write_text(dataset_toml(config, tmp_path / "dataset"), encoding="utf-8")
    train = tomllib.loads(text)
    dataset = tomllib.loads((tmp_path / "kohya_dataset.toml").read_text(encoding="utf-8"))
    return train, dataset, text, config


def wrong_keys(table: dict, allowed: dict) -> list[str]:
    return [f"{k} = {v!r}" for k, v in table.items() if k not in allowed or not has_type(allowed[k], v)]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_training_key_is_a_train_network_option_of_the_right_type(tmp_path, name):
    train, _, _, _ = write_pair(tmp_path, name)
    assert list(train) == ["train"]  # sd-scripts merges every table into one namespace
    options = train["train"]
    assert not wrong_keys(options, TRAIN_OPTIONS)
    assert [f"{k} = {options[k]!r}" for k in TRAIN_CHOICES if k in options and options[k] not in TRAIN_CHOICES[k]] == []


@pytest.mark.parametrize("name", CONFIGS)
def test_dataset_toml_matches_sd_scripts_dataset_schema(tmp_path, name):
    _, dataset, _, config = write_pair(tmp_path, name)
    assert set(dataset) <= {"general", "datasets"}
    assert not wrong_keys(dataset["general"], GENERAL_KEYS)
    assert isinstance(dataset["datasets"], list) and dataset["datasets"]
    for entry in dataset["datasets"]:
        assert not wrong_keys({k: v for k, v in entry.items() if k != "subsets"}, DATASET_KEYS)
        assert isinstance(entry["subsets"], list) and entry["subsets"]
        for subset in entry["subsets"]:
            assert SUBSET_REQUIRED <= set(subset) and not wrong_keys(subset, DREAMBOOTH_SUBSET_KEYS)
    (subset,) = dataset["datasets"][0]["subsets"]
    assert Path(subset["image_dir"]).is_absolute() and Path(subset["image_dir"]) == (tmp_path / "dataset").resolve()
    assert subset["num_repeats"] == config.num_repeats


def test_paths_are_absolute_even_when_given_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.safetensors").write_bytes(b"")
    text = training_toml(
        TrainConfig(), base_model_path="base.safetensors", dataset_config="run/kohya_dataset.toml", output_dir="Lora",
        output_name="kat", total_steps=10, warmup_steps=0, v_parameterization=False, v2=False, mixed_precision="fp16",
        optimizer="AdamW",
    )
    train = tomllib.loads(text)["train"]
    assert train["pretrained_model_name_or_path"] == str(tmp_path.resolve() / "base.safetensors")
    assert train["dataset_config"] == str(tmp_path.resolve() / "run" / "kohya_dataset.toml")
    assert train["output_dir"] == str(tmp_path.resolve() / "Lora")
    assert "placeholder" not in text


def test_a_model_from_no_file_gets_a_placeholder_and_says_so(tmp_path):
    train, _, text, _ = write_pair(tmp_path, "in-memory model")
    assert train["train"]["pretrained_model_name_or_path"] == MODEL_PLACEHOLDER
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert any("pretrained_model_name_or_path" in line and "placeholder" in line for line in comments)


def test_values_mean_what_lora_kit_did(tmp_path):
    def options(name):
        return write_pair(tmp_path / name, name)[0]["train"]

    for name in CONFIGS:
        (tmp_path / name).mkdir()
    lora = options("LoRA")
    assert lora["max_train_epochs"] == 10 and lora["max_train_steps"] == 630
    assert lora["learning_rate"] == lora["unet_lr"] == 5e-4 and lora["text_encoder_lr"] == [1e-4]
    assert lora["mixed_precision"] == "bf16" and lora["network_module"] == "networks.lora"
    assert lora["max_token_length"] == 225 and lora["min_snr_gamma"] == 5.0
    assert lora["lr_warmup_steps"] == 31 and lora["lr_scheduler_num_cycles"] == 3
    assert lora["optimizer_args"] == ["weight_decay=0.1", "betas=(0.9,0.99)"]
    assert not {"v2", "v_parameterization", "network_args", "noise_offset", "network_dropout", "network_train_unet_only"} & set(lora)
    # sd-scripts lets max_train_epochs override max_train_steps: a step-limited run writes only steps.
    steps = options("max_train_steps")
    assert steps["max_train_steps"] == 500 and "max_train_epochs" not in steps
    unet = options("UNet only")
    assert unet["network_train_unet_only"] is True and "text_encoder_lr" not in unet and unet["train_batch_size"] == 8
    assert options("LoCon")["network_args"] == ["conv_dim=8", "conv_alpha=4.0"]
    sd2 = options("SD2 v-param")
    assert sd2["v2"] is sd2["v_parameterization"] is True and sd2["mixed_precision"] == "fp16"
    extras = options("extras")
    assert extras["noise_offset"] == 0.05 and extras["network_dropout"] == 0.1
    assert extras["training_comment"] == "first try" and extras["metadata_trigger_phrase"] == "kat3r1na"
    assert options("polynomial")["lr_scheduler_power"] == 2.0
    constant = options("constant")
    assert "lr_warmup_steps" not in constant  # sd-scripts refuses warmup steps for "constant"
    assert options("Adafactor")["optimizer_args"] == ["scale_parameter=False", "relative_step=False", "warmup_init=False", "weight_decay=0.1"]
    off = options("75 tokens, off switches")
    assert not {"max_token_length", "min_snr_gamma", "save_last_n_epochs"} & set(off) and off["cache_latents"] is False
    floats = options("int-valued floats")
    assert floats["network_alpha"] == 8.0 and isinstance(floats["network_alpha"], float) and isinstance(floats["max_grad_norm"], float)


# The checks sd-scripts itself runs on these files before training: its parser, its config-file
# reader, its dataset-config sanitizer and blueprint. Run with sd-scripts' folder as the working
# directory, in a Python that can import it.
_PROBE = """
import json, sys
from dataclasses import asdict
sys.path.insert(0, ".")
sys.argv = ["train_network.py", "--config_file", sys.argv[1]]
import train_network
from library import config_util, train_util
parser = train_network.setup_parser()
args = train_util.read_config_from_file(parser.parse_args(), parser)
train_util.verify_training_args(args)
train_util.prepare_dataset_args(args, True)
user_config = config_util.load_user_config(args.dataset_config)
blueprint = config_util.BlueprintGenerator(config_util.ConfigSanitizer(True, True, False, True)).generate(user_config, args)
dataset = blueprint.dataset_group.datasets[0]
print("PROBE " + json.dumps({
    "options": sorted(a.dest for a in parser._actions),
    "dataset": asdict(dataset.params),
    "subsets": [asdict(s.params) for s in dataset.subsets],
}, default=str))
"""


@pytest.mark.skipif(not os.environ.get("LORAKIT_SD_SCRIPTS"), reason="LORAKIT_SD_SCRIPTS (an sd-scripts checkout) not set")
@pytest.mark.parametrize("name", CONFIGS)
def test_sd_scripts_own_loader_accepts_the_pair(tmp_path, name):
    train, _, _, config = write_pair(tmp_path, name)
    python = os.environ.get("LORAKIT_SD_SCRIPTS_PYTHON", sys.executable)
    done = subprocess.run(
        [python, "-c", _PROBE, str(tmp_path / "kohya_config.toml")], cwd=os.environ["LORAKIT_SD_SCRIPTS"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-4000:]
    probe = json.loads(lines[-1][len("PROBE "):])
    assert set(train["train"]) <= set(probe["options"])
    assert probe["dataset"]["batch_size"] == config.train_batch_size
    assert probe["dataset"]["resolution"] == [config.resolution, config.resolution]
    assert probe["dataset"]["enable_bucket"] is config.enable_bucket
    (subset,) = probe["subsets"]
    assert subset["image_dir"] == str((tmp_path / "dataset").resolve()) and subset["num_repeats"] == config.num_repeats
    assert subset["shuffle_caption"] is config.shuffle_tags and subset["keep_tokens"] == config.keep_tokens
    assert subset["caption_extension"] == ".txt" and subset["caption_dropout_rate"] == config.caption_dropout_rate


def test_several_folders_and_regularisation_are_subsets_sd_scripts_reads(tmp_path):
    from lorakit_ext.dataset.folders import parse_folders

    for name in ("dataset", "3_outfits", "reg/1_woman"):
        (tmp_path / name).mkdir(parents=True)
    config = TrainConfig(dataset_folders="3_outfits", reg_folders="reg", prior_loss_weight=0.5)
    folders = [*parse_folders(config.dataset_folders, tmp_path), *parse_folders(config.reg_folders, tmp_path, regularisation=True)]
    (tmp_path / "kohya_dataset.toml").write_text(dataset_toml(config, tmp_path / "dataset", folders), encoding="utf-8")
    subsets = tomllib.loads((tmp_path / "kohya_dataset.toml").read_text(encoding="utf-8"))["datasets"][0]["subsets"]
    assert all(SUBSET_REQUIRED <= set(subset) and not wrong_keys(subset, DREAMBOOTH_SUBSET_KEYS) for subset in subsets)
    assert [(Path(s["image_dir"]).name, s["num_repeats"], s.get("is_reg", False), s.get("class_tokens")) for s in subsets] == [
        ("dataset", 10, False, None), ("3_outfits", 3, False, "outfits"), ("1_woman", 1, True, "woman")]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base.safetensors").write_bytes(b"")
    text = training_toml(config, base_model_path=str(tmp_path / "models" / "base.safetensors"),
                         dataset_config=str(tmp_path / "kohya_dataset.toml"), output_dir=str(tmp_path / "Lora"), output_name="kat",
                         total_steps=630, warmup_steps=31, v_parameterization=False, v2=False, mixed_precision="bf16",
                         optimizer=config.optimizer)
    (tmp_path / "kohya_config.toml").write_text(text, encoding="utf-8")
    assert tomllib.loads(text)["train"]["prior_loss_weight"] == 0.5
    if not os.environ.get("LORAKIT_SD_SCRIPTS"):
        return  # sd-scripts' own loader below, when a checkout is at hand
    done = subprocess.run(
        [os.environ.get("LORAKIT_SD_SCRIPTS_PYTHON", sys.executable), "-c", _PROBE, str(tmp_path / "kohya_config.toml")],
        cwd=os.environ["LORAKIT_SD_SCRIPTS"], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-4000:]
    probe = json.loads(lines[-1][len("PROBE "):])
    assert [(Path(s["image_dir"]).name, s["num_repeats"], s["is_reg"]) for s in probe["subsets"]] == [
        ("dataset", 10, False), ("3_outfits", 3, False), ("1_woman", 1, True)]
