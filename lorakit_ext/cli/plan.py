"""``plan PROJECT``: the kohya-colab plan for a project's dataset and training settings."""

from __future__ import annotations

from lorakit_ext.cli.output import Result
from lorakit_ext.cli.train_options import add_train_options, config_from_args
from lorakit_ext.dataset.files import list_images
from lorakit_ext.errors import UserError
from lorakit_ext.project import open_project
from lorakit_ext.train.plan import plan_for


def register(sub, common) -> None:
    p = sub.add_parser("plan", parents=[common], help="show the training plan (steps, epochs, warmup)")
    p.add_argument("project", nargs="?", help="project whose dataset images are counted")
    p.add_argument("--images", type=int, help="plan for this many images instead of a project's dataset")
    add_train_options(p)
    p.set_defaults(handler=run)


def run(args) -> Result:
    config = config_from_args(args)
    folders = ([], [])
    if args.images is not None:
        images = args.images
    elif args.project:
        project = open_project(args.root, args.project)
        images = len(list_images(project.dataset))
        if config.dataset_folders.strip() or config.reg_folders.strip():
            # The reader of the folders is the trainer's, which loads torch: only when asked for.
            from lorakit_ext.train.preflight import folder_counts

            folders = folder_counts(config, project.path)
    else:
        raise UserError("give a PROJECT or --images N")
    if images <= 0:
        raise UserError("the dataset has no images; import some first")
    plan = plan_for(config, images, *folders)
    return Result({"plan": plan.to_dict()}, plan.text)
