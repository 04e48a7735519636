"""``train PROJECT --base-model CKPT``: headless LoRA training, same trainer as the A1111 tab."""

from __future__ import annotations

import signal
from pathlib import Path

from lorakit_ext.cli.output import Result
from lorakit_ext.cli.progress import ProgressPrinter
from lorakit_ext.cli.train_options import add_train_options, config_from_args
from lorakit_ext.errors import UserError
from lorakit_ext.project import open_project
from lorakit_ext.train.config import TrainConfig

DTYPES = ("auto", "fp32", "fp16", "bf16")


def register(sub, common) -> None:
    p = sub.add_parser("train", parents=[common], help="train a LoRA on a project's dataset")
    p.add_argument("project")
    p.add_argument("--base-model", required=True, help="SD1.x/SD2.x checkpoint (.safetensors or .ckpt; a .yaml beside it is used)")
    p.add_argument("--model-config", help="ldm .yaml for the checkpoint (default: beside it, or detected)")
    p.add_argument("--out", help="folder for the epoch files (default: <project>/output)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run (its id in <project>/runs/)")
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--weights", choices=DTYPES, default="auto", help="dtype of the base weights (default: fp16 on CUDA, fp32 on CPU)")
    add_train_options(p)
    p.set_defaults(handler=run)


def _device_and_dtype(device: str, weights: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU")
    if weights == "auto":
        weights = "fp16" if dev.type == "cuda" else "fp32"
    return dev, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[weights]


def run(args) -> Result:
    from lorakit_ext.models.checkpoint import load_sd_checkpoint
    from lorakit_ext.models.ldm import LdmModel
    from lorakit_ext.train.events import Interrupted
    from lorakit_ext.train.loop import Trainer, TrainJob
    from lorakit_ext.train.record import find_run_dir, new_run_dir
    from lorakit_ext.train.state import load_state

    project = open_project(args.root, args.project)
    resume_state = None
    if args.resume:
        run_dir = find_run_dir(project, args.resume)
        resume_state = load_state(run_dir)
        # A resumed run keeps its own settings: changing them midway would not reproduce anything.
        config = TrainConfig.from_dict(resume_state["config"]).validate()
    else:
        config = config_from_args(args)
    output_name = config.output_name or project.name
    out = Path(args.out).expanduser().resolve() if args.out else project.path / "output"
    device, dtype = _device_and_dtype(args.device, args.weights)
    sd_model, info = load_sd_checkpoint(args.base_model, args.model_config, device=device, dtype=dtype)
    model = LdmModel(sd_model, clip_skip=config.clip_skip, max_token_length=config.max_token_length)
    if not args.resume:
        run_dir = new_run_dir(project, output_name)
    job = TrainJob(
        config,
        project,
        out,
        run_dir,
        base_model_name=Path(args.base_model).name,
        base_model_hash=info.legacy_hash,
        base_model_sha256=info.sha256,
        patch_attention=True,
    )
    stop = {"asked": False}

    def on_sigint(signum, frame):
        stop["asked"] = True
        print("stopping after this step (Ctrl-C again to abort without saving)…", flush=True)
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = Trainer(model, job, on_progress=ProgressPrinter(), should_stop=lambda: stop["asked"]).run(resume_state)
    except Interrupted:
        resume = f"python -m lorakit_ext train {project.name} --base-model {args.base_model} --resume {run_dir.name}"
        return Result({"status": "interrupted", "run": run_dir.name, "resume": resume}, f"interrupted; state saved in {run_dir}\nresume with: {resume}", ok=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    files = [str(f) for f in result.files]
    text = "\n".join(
        [f"trained {result.steps} steps; final loss {result.losses[-1]:.4f}" if result.losses else f"trained {result.steps} steps"]
        + [f"  {f}" for f in files]
        + [f"run record: {run_dir}"]
    )
    return Result({"status": result.status, "files": files, "steps": result.steps, "run": run_dir.name, "run_dir": str(run_dir)}, text)
