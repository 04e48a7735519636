"""Training options shared by ``plan`` and ``train``: ``--config FILE`` plus ``--set key=value``
and a few common flags, all turned into one validated :class:`TrainConfig`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorakit_ext.errors import UserError
from lorakit_ext.models.family_presets import FAMILY_SETTINGS, SD1_SETTINGS, FamilySettings
from lorakit_ext.train_config import TrainConfig, load_config_file

if TYPE_CHECKING:
    from lorakit_ext.models.families.base import ModelFamily

# Every family's presets; a run takes those of its checkpoint's family. Read from the torch-free
# tables: building the parser must not import torch.
PRESET_NAMES = sorted({name for family in FAMILY_SETTINGS for name in family.presets})

# The options people change most often get their own flags; everything else is --set key=value.
_FLAGS = {
    "repeats": "num_repeats",
    "epochs": "max_train_epochs",
    "steps": "max_train_steps",
    "batch_size": "train_batch_size",
    "prior_loss_weight": "prior_loss_weight",
}
# Repeatable flags, one line each of a TrainConfig field that holds one folder per line.
_FOLDER_FLAGS = {"dataset_folder": "dataset_folders", "reg_folder": "reg_folders"}


def add_train_options(parser) -> None:
    group = parser.add_argument_group("training options")
    group.add_argument("--config", help="a .json or .toml file of TrainConfig options")
    group.add_argument("--preset", choices=PRESET_NAMES, help="start from a preset of the model's family (default: kohya-colab's defaults for it)")
    group.add_argument("--repeats", type=int, help="num_repeats (default 10)")
    group.add_argument("--epochs", type=int, help="max_train_epochs (default 10)")
    group.add_argument("--steps", type=int, help="max_train_steps instead of epochs")
    group.add_argument("--batch-size", type=int, help="train_batch_size (default 2)")
    group.add_argument("--dataset-folder", action="append", default=[], metavar="'[REPEATS] FOLDER'",
                       help="a further image folder trained beside the project's dataset: '5 /data/outfits', a kohya "
                            "'5_name' folder, or a folder of those; relative paths are inside the project; repeatable")
    group.add_argument("--reg-folder", action="append", default=[], metavar="'[REPEATS] FOLDER'",
                       help="regularisation images, as --dataset-folder ('1 reg': the project's generated ones); repeatable")
    group.add_argument("--prior-loss-weight", type=float, help="loss weight of regularisation images (default 1.0)")
    group.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig option, repeatable"
    )


def config_from_args(args, family: ModelFamily | FamilySettings = SD1_SETTINGS) -> TrainConfig:
    """The options given, over ``family``'s defaults and preset (SD1's when no model says otherwise)."""
    if args.preset and args.preset not in family.presets:
        raise UserError(f"preset {args.preset!r} is not one of {family.label}'s: {', '.join(family.presets)}")
    given: dict = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        given[key.strip()] = value.strip()
    for flag, name in _FLAGS.items():
        if getattr(args, flag) is not None:
            given[name] = getattr(args, flag)
    for flag, name in _FOLDER_FLAGS.items():
        if getattr(args, flag):
            given[name] = "\n".join(getattr(args, flag))
    preset = family.presets[args.preset] if args.preset else {}
    config_file = load_config_file(args.config) if args.config else {}
    return TrainConfig.from_sources(family.defaults, preset, config_file, given).validate()


def given_train_options(args) -> list[str]:
    """The training options given on the command line, as their flags (for refusing them)."""
    given = [f"--{name}" for name in ("config", "preset") if getattr(args, name)]
    given += [f"--{flag.replace('_', '-')}" for flag in _FLAGS if getattr(args, flag) is not None]
    given += [f"--{flag.replace('_', '-')} {line}" for flag in _FOLDER_FLAGS for line in getattr(args, flag)]
    given += [f"--set {item}" for item in args.set]
    return given
