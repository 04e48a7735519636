"""kohya sd-scripts' option names come in as TrainConfig fields: a kohya-colab style config pair
trains as written, options LoRA Kit lacks are refused by name, and the kohya TOML pair a run writes
reads back to the very config the run had."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lorakit_ext.cli import main
from lorakit_ext.errors import UserError
from lorakit_ext.export.kohya_toml import dataset_toml, training_toml
from lorakit_ext.models.families import preset
from lorakit_ext.train_config import TrainConfig, load_config_file

KOHYA_COLAB = """
[model_arguments]
pretrained_model_name_or_path = "/models/anime.safetensors"
v2 = false

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 16
network_alpha = 8
network_args = ["conv_dim=8", "conv_alpha=4"]
unet_lr = 0.0005
text_encoder_lr = 0.0001

[optimizer_arguments]
learning_rate = 0.0005
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 3
lr_warmup_steps = 63
optimizer_type = "AdamW8bit"
optimizer_args = ["weight_decay=0.1", "betas=[0.9,0.99]"]

[training_arguments]
max_train_steps = 1260
max_train_epochs = 10
save_every_n_epochs = 1
save_last_n_epochs = 10
train_batch_size = 2
clip_skip = 2
min_snr_gamma = 5.0
seed = 42
max_token_length = 225
xformers = true
mixed_precision = "fp16"
output_dir = "/out"
output_name = "kat"
dataset_config = "{dataset}"
"""

KOHYA_DATASET = """
[general]
resolution = 768
shuffle_caption = true
keep_tokens = 1
flip_aug = false
caption_extension = ".txt"
enable_bucket = true
bucket_no_upscale = false
bucket_reso_steps = 64
min_bucket_reso = 256
max_bucket_reso = 1024

[[datasets]]

[[datasets.subsets]]
num_repeats = 10
image_dir = "/data/kat"
"""


def test_a_kohya_colab_config_pair_reads_as_the_user_wrote_it(tmp_path):
    (tmp_path / "dataset.toml").write_text(KOHYA_DATASET, encoding="utf-8")
    (tmp_path / "training.toml").write_text(KOHYA_COLAB.replace("{dataset}", str(tmp_path / "dataset.toml")), encoding="utf-8")
    c = TrainConfig.from_file(tmp_path / "training.toml").validate()
    assert (c.network_type, c.network_dim, c.network_alpha, c.conv_dim, c.conv_alpha) == ("LoCon", 16, 8.0, 8, 4.0)
    assert (c.unet_lr, c.text_encoder_lr, c.optimizer, c.optimizer_args) == (5e-4, 1e-4, "AdamW8bit", "")
    assert (c.weight_decay, c.adam_beta1, c.adam_beta2) == (0.1, 0.9, 0.99)
    # max_train_epochs wins over max_train_steps, as in sd-scripts; 63 of 1260 steps warm up.
    assert (c.max_train_epochs, c.max_train_steps, c.lr_warmup_ratio) == (10, 0, 0.05)
    assert (c.keep_only_last_n_epochs, c.train_batch_size, c.mixed_precision, c.output_name) == (10, 2, "fp16", "kat")
    # The dataset TOML's options, by their kohya names.
    assert (c.resolution, c.num_repeats, c.shuffle_tags, c.keep_tokens, c.max_bucket_reso) == (768, 10, True, 1, 1024)


@pytest.mark.parametrize("text, named", [
    ("color_aug = true", "color_aug"),
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=locon", "dora_wd=True"]', "DoRA"),
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=ia3"]', "algo=ia3"),
    ('network_module = "networks.oft"', "networks.oft"),
    ("text_encoder_lr = [0.0001, 0.00005]", "separate rates for two text encoders"),
    ('resolution = "1024,768"', "square resolution"),
])
def test_options_lora_kit_cannot_honour_are_refused_by_name(tmp_path, text, named):
    path = tmp_path / "c.toml"
    path.write_text("[train]\n" + text + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=named.replace("[", r"\[")):
        TrainConfig.from_file(path)


def test_several_dataset_tables_are_refused(tmp_path):
    # kohya trains each [[datasets]] table at its own resolution; LoRA Kit has one.
    (tmp_path / "d.toml").write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n[[datasets]]\n'
                                     '[[datasets.subsets]]\nimage_dir = "reg"\nis_reg = true\n', encoding="utf-8")
    (tmp_path / "c.toml").write_text(f'[train]\ndataset_config = "{tmp_path / "d.toml"}"\n', encoding="utf-8")
    with pytest.raises(UserError, match="several \\[\\[datasets\\]\\] tables"):
        TrainConfig.from_file(tmp_path / "c.toml")


@pytest.mark.parametrize("config", [
    TrainConfig(),
    preset("SDXL · NoobAI v-pred", validation_split=0.2, validate_every_n_epochs=2, cuda_graphs=False, trigger="kat"),
    TrainConfig(network_type="LoCon", optimizer="Prodigy", unet_lr=1.0, text_encoder_lr=0.0, lr_warmup_ratio=0.07,
                optimizer_args="decouple=True d_coef=2", max_train_steps=333, shuffle_tags=False, max_token_length=75,
                cache_text_encoder_outputs=False, lr_scheduler="polynomial", lr_scheduler_num_cycles=2,
                caption_tag_dropout_rate=0.1, caption_dropout_every_n_epochs=3, multires_noise_iterations=6,
                multires_noise_discount=0.25, ip_noise_gamma=0.05, gradient_accumulation_steps=4, save_every_n_steps=50,
                cache_latents_to_disk=True),
    TrainConfig(optimizer="Adafactor", optimizer_args="relative_step=True scale_parameter=True", mixed_precision="auto"),
    TrainConfig(network_type="LoHa", conv_dim=4, conv_alpha=2.0),
    TrainConfig(network_type="LoKr", network_dim=8, network_alpha=8.0, conv_dim=8, conv_alpha=1.0, text_encoder_lr=0.0),
])
def test_the_kohya_pair_a_run_writes_reads_back_to_the_same_config(tmp_path, config):
    (tmp_path / "kohya_dataset.toml").write_text(dataset_toml(config, tmp_path / "dataset"), encoding="utf-8")
    text = training_toml(config, base_model_path="/m.safetensors", dataset_config=str(tmp_path / "kohya_dataset.toml"),
                         output_dir=str(tmp_path), output_name="kat", total_steps=630, warmup_steps=31,
                         v_parameterization=False, v2=False, mixed_precision="bf16", optimizer=config.optimizer)
    (tmp_path / "kohya_config.toml").write_text(text, encoding="utf-8")
    back = TrainConfig.from_file(tmp_path / "kohya_config.toml")
    differences = {f.name: (getattr(config, f.name), getattr(back, f.name)) for f in dataclasses.fields(config)
                   if getattr(config, f.name) != getattr(back, f.name)}
    assert differences == {}


def test_train_takes_a_kohya_config_and_says_which_option_it_cannot_take(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nmasked_loss = true\nnetwork_dim = 8\n", encoding="utf-8")
    assert main(["plan", "--images", "20", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "does not support: masked_loss" in err
    path.write_text('[train]\nnetwork_dim = 8\noptimizer_type = "adamw"\nsave_last_n_epochs = 3\n', encoding="utf-8")
    assert main(["plan", "--images", "20", "--config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["images"] == 18
    assert load_config_file(path)["save_last_n_epochs"] == 3


def test_a_kohya_sample_prompt_file_reads_as_sample_prompt(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# portraits\nkat, smile --w 512 --h 768 --d 1 --l 7 --n lowres\n\n  kat, red hair --s 28\n", encoding="utf-8")
    path = tmp_path / "c.toml"
    path.write_text(f'[train]\nsample_prompts = "{prompts.as_posix()}"\nsample_every_n_epochs = 2\nsample_sampler = "euler_a"\n',
                    encoding="utf-8")
    config = TrainConfig.from_file(path)
    assert config.sample_prompt == "kat, smile\nkat, red hair" and config.sample_every_n_epochs == 2
    for name, remedy in (("prompts.toml", "reads the .txt prompt file"), ("missing.txt", "could not be read")):
        path.write_text(f'[train]\nsample_prompts = "{(tmp_path / name).as_posix()}"\n', encoding="utf-8")
        with pytest.raises(UserError, match=remedy):
            TrainConfig.from_file(path)


def test_a_runs_sample_prompt_file_reads_back_to_the_prompt_it_was_given(tmp_path):
    # Empty: the run drew the dataset's typical prompt, which the file holds; reading back keeps it empty.
    for given in ("", "kat, smile"):
        config = TrainConfig(sample_every_n_epochs=1, sample_prompt=given)
        (tmp_path / "prompts.txt").write_text("kat, 1girl --w 512 --h 512 --d 42 --s 20 --l 7\n", encoding="utf-8")
        text = training_toml(config, base_model_path="/m.safetensors", dataset_config=str(tmp_path / "d.toml"),
                             output_dir=str(tmp_path), output_name="kat", total_steps=630, warmup_steps=31,
                             v_parameterization=False, v2=False, mixed_precision="bf16", optimizer=config.optimizer,
                             sample_prompts=str(tmp_path / "prompts.txt"))
        (tmp_path / "d.toml").write_text(dataset_toml(config, tmp_path / "dataset"), encoding="utf-8")
        (tmp_path / "c.toml").write_text(text, encoding="utf-8")
        assert TrainConfig.from_file(tmp_path / "c.toml") == config
