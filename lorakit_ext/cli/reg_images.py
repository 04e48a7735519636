"""``reg-images PROJECT --base-model CKPT``: regularisation images drawn headless by LoRA
Kit's DDIM on the checkpoint, from the dataset's captions without the trigger, into
``<project>/reg/`` (see :mod:`lorakit_ext.dataset.reg_images`); the tab draws them with A1111's
txt2img instead."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lorakit_ext.cli.a1111_dir import add_a1111_dir
from lorakit_ext.cli.output import Result
from lorakit_ext.cli.progress import first_ctrl_c_stops
from lorakit_ext.cli.train import DTYPES
from lorakit_ext.errors import UserError
from lorakit_ext.project import open_project
from lorakit_ext.project_lock import ProjectLock
from lorakit_ext.train_config import TrainConfig

# The UNet halves the latent three times, so headless sides are multiples of 8 × 8 pixels.
SIDE_MULTIPLE = 64
MAX_STEPS = 1000  # DDIM's steps come from the 1000 of the training schedule


def register(sub, common) -> None:
    p = sub.add_parser(
        "reg-images",
        parents=[common],
        help="draw regularisation images from the dataset's captions without the trigger",
        description="Draws images with the base model from the dataset's captions minus the trigger into "
        "<project>/reg/ as reg-0001.png + reg-0001.txt (the prompt as caption), numbered after the files "
        "already there: nothing is replaced. Train with them through the line '1 reg' in reg_folders. "
        "Ctrl-C stops after the current image.",
    )
    p.add_argument("project", help="an existing project")
    p.add_argument("--base-model", required=True, help="the checkpoint the LoRA will train on (.safetensors or .ckpt)")
    p.add_argument("--trigger", default="", help="the trigger tag(s) to leave out of the prompts, comma-separated (default: none; the captions are used whole)")
    p.add_argument("--count", type=int, help="how many images to draw (default: one per dataset image)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps per image (default: 20)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model family's training resolution)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model family's training resolution)")
    p.add_argument("--seed", type=int, default=TrainConfig.seed, help=f"image n is drawn at seed + n - 1 (default: {TrainConfig.seed})")
    p.add_argument("--model-config", help="ldm/sgm .yaml for the checkpoint (default: beside it, or detected)")
    add_a1111_dir(p)
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--weights", default="auto", choices=DTYPES, help="dtype of the weights (default: fp16 on CUDA, fp32 on CPU)")
    p.set_defaults(handler=run)


def _check_numbers(args) -> None:
    if args.count is not None and args.count < 1:
        raise UserError(f"--count {args.count}: draw at least 1 image")
    if not 1 <= args.steps <= MAX_STEPS:
        raise UserError(f"--steps {args.steps} is outside 1–{MAX_STEPS}; 20 is usual")
    for flag in ("width", "height"):
        value = getattr(args, flag)
        if value is not None and (value < SIDE_MULTIPLE or value % SIDE_MULTIPLE):
            raise UserError(f"--{flag} {value} is not a positive multiple of {SIDE_MULTIPLE}; use e.g. 512 or 1024")


def run(args) -> Result:
    from lorakit_ext.dataset.reg_images import dataset_reg_prompts

    project = open_project(args.root, args.project)
    _check_numbers(args)
    prompts = dataset_reg_prompts(project, args.trigger)
    with ProjectLock(project.path, "drawing regularisation images (CLI)"):
        return _draw(args, project, prompts)


def _draw(args, project, prompts) -> Result:
    from lorakit_ext.cli.train import _device_and_dtype
    from lorakit_ext.compare.sample import sample
    from lorakit_ext.dataset.reg_images import REG_LINE, prompts_note, write_reg_images
    from lorakit_ext.models.checkpoint import family_of_checkpoint, load_sd_checkpoint
    from lorakit_ext.models.families import adapter_for
    from lorakit_ext.models.sgm_import import use_a1111_model_code

    use_a1111_model_code(args.a1111_dir)
    checkpoint = Path(args.base_model).expanduser()
    # The family's training defaults: the size it trains at and the text encoding it trains with.
    config = family_of_checkpoint(checkpoint).train_config()
    size = (args.width or config.resolution, args.height or config.resolution)
    device, dtype = _device_and_dtype(args.device, args.weights)
    sd_model, _ = load_sd_checkpoint(checkpoint, args.model_config, device=device, dtype=dtype)
    model = adapter_for(sd_model, clip_skip=config.clip_skip, max_token_length=config.max_token_length)

    def render(prompt: str, seed: int):
        return sample(model, prompt, "", seed=seed, size=size, steps=args.steps)

    with first_ctrl_c_stops("stopping after this image (Ctrl-C again to abort at once)…") as should_stop:
        report = write_reg_images(project, prompts, render, seed=args.seed, count=args.count,
                                  on_progress=_printer(), should_stop=should_stop)
    train = f"python -m lorakit_ext train {project.name} --root {project.root} --base-model {checkpoint} --reg-folder '{REG_LINE}'"
    lines = [report.text(), prompts_note(args.trigger)]
    if report.stopped:
        lines.append("run the same command again to draw more; the numbering continues")
    lines += [f"train with them: {train}", f"add this line to reg_folders: {REG_LINE}"]
    data = {"status": "interrupted" if report.stopped else "done", **report.as_dict()}
    return Result(data, "\n".join(lines), ok=not report.stopped, exit_code=130 if report.stopped else None)


def _printer():
    from lorakit_ext.train.events import clock

    start = time.monotonic()

    def show(done: int, total: int, path) -> None:
        if path is None:
            print(f"drawing {total} regularisation images…", file=sys.stderr, flush=True)
            return
        per_image = (time.monotonic() - start) / done
        print(f"{path.name}  {done}/{total}  {per_image:.1f} s/image  ETA {clock(per_image * (total - done))}",
              file=sys.stderr, flush=True)

    return show
