import json

import pytest
import torch

from lorakit_ext.cli import main
from lorakit_ext.errors import UserError
from lorakit_ext.models.families import PRESETS, preset
from lorakit_ext.train.plan import make_plan
from lorakit_ext.train_config import TrainConfig


def test_plan_has_kohya_colab_lines_exactly():
    plan = make_plan(126, 10, 2, 10)
    assert plan.lines == [
        "Found 126 images with 10 repeats, equaling 1260 steps.",
        "Divide 1260 steps by 2 batch size to get 630.0 steps per epoch.",
        "There will be 10 epochs, for around 6300 total training steps.",
    ]
    assert plan.total_steps == 6300
    assert plan.warmup_steps == 315


def test_plan_in_steps_says_how_many_epochs():
    plan = make_plan(126, 10, 2, max_train_steps=2000)
    assert plan.lines[-1] == "There will be 2000 steps, divided into 3 epochs and then some."
    assert plan.total_steps == 2000 and plan.warmup_steps == 100


def test_plan_odd_batch_keeps_fraction_and_floors_total():
    plan = make_plan(25, 3, 2, 3)
    assert plan.lines[1] == "Divide 75 steps by 2 batch size to get 37.5 steps per epoch."
    assert plan.total_steps == 112


def test_plan_warns_over_ten_thousand_steps():
    assert make_plan(200, 10, 2, 10).warnings == []
    plan = make_plan(300, 40, 1, 10)
    assert plan.total_steps == 120000
    assert "over 10000" in plan.warnings[0]


@pytest.mark.parametrize("images,repeats,hint", [(30, 10, False), (126, 10, True), (10, 5, True)])
def test_plan_hints_when_image_steps_outside_200_400(images, repeats, hint):
    assert bool(make_plan(images, repeats, 2).hints) is hint


def test_defaults_are_kohya_colab():
    c = TrainConfig()
    assert (c.resolution, c.num_repeats, c.max_train_epochs, c.train_batch_size) == (512, 10, 10, 2)
    assert (c.unet_lr, c.text_encoder_lr, c.lr_scheduler, c.lr_scheduler_num_cycles) == (5e-4, 1e-4, "cosine_with_restarts", 3)
    assert (c.network_dim, c.network_alpha, c.conv_dim, c.conv_alpha) == (16, 8.0, 8, 4.0)
    assert (c.min_snr_gamma, c.keep_tokens, c.seed, c.max_token_length) == (5.0, 1, 42, 225)
    assert (c.min_bucket_reso, c.max_bucket_reso, c.bucket_reso_steps, c.lr_warmup_ratio) == (256, 1024, 64, 0.05)
    TrainConfig().validate()


def test_every_field_has_form_metadata():
    for spec in TrainConfig.field_specs():
        assert spec.metadata["label"] and spec.metadata["help"] and spec.metadata["group"], spec.name


@pytest.mark.parametrize(
    "values,message",
    [
        ({"unet_lr": -1}, "unet_lr = -1.0 is below the minimum"),
        ({"network_dim": 0}, "network_dim = 0 is below the minimum 1"),
        ({"optimizer": "SGDNesterov9bit"}, "optimizer = 'SGDNesterov9bit' is not one of"),
        ({"lr_scheduler": "rex"}, "lr_scheduler = 'rex' is not one of"),
        ({"unet_lr": 0, "text_encoder_lr": 0}, "nothing would be trained"),
        ({"resolution": 500}, "not a multiple of bucket_reso_steps"),
        ({"resolution": 2048}, "must lie between"),
        ({"output_name": "../evil"}, "path separator"),
    ],
)
def test_bad_values_are_rejected_with_the_reason(values, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        TrainConfig.from_dict(values).validate()


def test_from_dict_coerces_form_strings_and_rejects_unknown_keys():
    c = TrainConfig.from_dict({"network_dim": "32", "flip_aug": "true", "unet_lr": "1e-4", "max_train_epochs": 5.0})
    assert (c.network_dim, c.flip_aug, c.unet_lr, c.max_train_epochs) == (32, True, 1e-4, 5)
    with pytest.raises(UserError, match="LoRA Kit does not support: bogus_option, color_aug"):
        TrainConfig.from_dict({"bogus_option": 1, "color_aug": True})
    with pytest.raises(UserError, match="not a valid int"):
        TrainConfig.from_dict({"network_dim": "2.5"})
    with pytest.raises(UserError, match="not a valid bool"):
        TrainConfig.from_dict({"flip_aug": "maybe"})


def test_presets_are_valid_configs():
    for name in PRESETS:
        preset(name).validate()
    assert preset("kohya-colab (photo)").clip_skip == 1
    with pytest.raises(UserError, match="unknown preset"):
        preset("nope")


def test_the_forms_offer_every_familys_presets_with_its_defaults():
    from lorakit_ext.models.families import defaults_of_model

    # SD1's (shared with SD2) first and by their own names; SDXL's named with their family.
    assert next(iter(PRESETS)) == "kohya-colab (anime)" and preset("kohya-colab (anime)").resolution == 512
    xl = preset("SDXL · kohya-colab XL")
    assert (xl.resolution, xl.train_batch_size, xl.unet_lr, xl.network_dim) == (1024, 4, 3e-4, 8)
    vpred = preset("SDXL · NoobAI v-pred")
    assert vpred.zero_terminal_snr and vpred.scale_v_pred_loss_like_noise_pred and vpred.resolution == 1024
    assert not any(label.startswith("SD2 · ") for label in PRESETS)
    # The HTTP API fills what a request leaves out with the loaded model's family's defaults.
    sdxl_like = torch.nn.Module()
    sdxl_like.is_sdxl = True
    assert defaults_of_model(sdxl_like)["resolution"] == 1024
    assert defaults_of_model(None) == {}


def test_plan_cli_counts_project_images_and_reads_config_files(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "projects"
    assert main(["project", "create", "kat", "--root", str(root)]) == 0
    for i in range(30):
        Image.new("RGB", (8, 8), (i, i, i)).save(root / "kat" / "dataset" / f"{i}.png")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"num_repeats": 8, "train_batch_size": 4}))
    capsys.readouterr()
    assert main(["plan", "kat", "--root", str(root), "--config", str(cfg), "--epochs", "5", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    # 3 of the 30 are held out for validation loss (validation_split 0.1), and the plan says so.
    assert plan["lines"][0] == "Found 27 images with 8 repeats, equaling 216 steps."
    assert plan["lines"][-1] == "Validation loss: 3 of 30 images held out of training (10%)."
    assert plan["total_steps"] == 270


def test_plan_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["plan", "nothere", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no project 'nothere'") and err.count("\n") == 1
    assert main(["plan", "--images", "10", "--set", "network_dim=0"]) == 2
    assert "network_dim = 0 is below the minimum 1" in capsys.readouterr().err


def test_max_steps_wins_over_the_epochs_in_lora_kits_own_options(tmp_path, capsys):
    # The tab sends every field and the CLI starts from its family's defaults, so the epochs are
    # always there beside a number of steps; "Epochs" says it is ignored when "Max steps" is set.
    form = {**TrainConfig().to_dict(), "max_train_steps": "60"}
    config = TrainConfig.from_dict(form).validate()
    assert (config.max_train_epochs, config.max_train_steps) == (10, 60)
    assert TrainConfig.from_dict(config.to_dict()) == config  # a run's config.json, as resume reads it
    capsys.readouterr()
    assert main(["plan", "--images", "30", "--steps", "60", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["total_steps"] == 60
    assert main(["plan", "--images", "30", "--set", "max_train_steps=45", "--epochs", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["total_steps"] == 45


def test_a_kohya_file_of_steps_alone_trains_its_steps_over_the_family_defaults(tmp_path, capsys):
    # sd-scripts' own rule (epochs over steps) holds inside one kohya file only: a file that gives
    # steps alone must not lose them to the epochs LoRA Kit's defaults carry.
    cfg = tmp_path / "steps.toml"
    cfg.write_text("[training_arguments]\nmax_train_steps = 500\nlr_warmup_steps = 50\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["plan", "--images", "30", "--config", str(cfg), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert (plan["total_steps"], plan["warmup_steps"]) == (500, 50)


def test_a_kohya_name_given_later_overrides_what_the_family_defaults_set(tmp_path):
    # SDXL's defaults set unet_lr; sd-scripts' learning_rate given on the command line, in a kohya
    # file or in a request must still set the rates (LoRA Kit's names win only inside one source).
    from lorakit_ext.cli import build_parser
    from lorakit_ext.cli.train_options import config_from_args
    from lorakit_ext.models.family_presets import SDXL_SETTINGS

    def rates(*argv):
        c = config_from_args(build_parser().parse_args(["train", "kat", *argv]), SDXL_SETTINGS)
        return c.unet_lr, c.text_encoder_lr

    assert rates() == (3e-4, 6e-5)
    assert rates("--set", "learning_rate=1e-4") == (1e-4, 1e-4)
    kohya = tmp_path / "kohya.toml"
    kohya.write_text("[optimizer_arguments]\nlearning_rate = 2e-4\n", encoding="utf-8")
    assert rates("--config", str(kohya)) == (2e-4, 2e-4)
    # Inside one source sd-scripts' precedence holds: unet_lr over learning_rate.
    assert rates("--set", "learning_rate=1e-4", "--set", "unet_lr=5e-4") == (5e-4, 1e-4)
    request = TrainConfig.from_sources(SDXL_SETTINGS.defaults, {"learning_rate": 1e-4, "network_train_unet_only": True})
    assert (request.unet_lr, request.text_encoder_lr, request.resolution) == (1e-4, 0.0, 1024)
