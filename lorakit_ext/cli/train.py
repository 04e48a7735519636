"""``train PROJECT --base-model CKPT``: headless LoRA training, same trainer as the A1111 tab.

``train PROJECT --resume RUN`` continues an interrupted run with everything it started with (the
run record holds base model, output folder, device options and settings); options that would
change the run are refused.

``train PROJECT --gpus N`` (or ``torchrun --nproc-per-node N -m lorakit_ext train PROJECT …``)
trains data-parallel (:mod:`lorakit_ext.train.data_parallel`): rank 0 takes the project's lock,
checks the settings and creates the run folder, and tells the other ranks what it found.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from lorakit_ext.cli.a1111_dir import add_a1111_dir
from lorakit_ext.cli.output import Result
from lorakit_ext.cli.progress import ProgressPrinter, first_ctrl_c_stops
from lorakit_ext.cli.stack_import import import_training_stack
from lorakit_ext.cli.train_options import add_train_options, config_from_args, given_train_options
from lorakit_ext.errors import UserError
from lorakit_ext.project import open_project
from lorakit_ext.project_lock import ProjectLock

DTYPES = ("auto", "fp32", "fp16", "bf16")
# The options a resume takes from the run record; given again, they must say the same.
_RECORDED = {"base_model": "--base-model", "model_config": "--model-config", "out": "--out", "device": "--device", "weights": "--weights"}


def register(sub, common) -> None:
    p = sub.add_parser("train", parents=[common], help="train a LoRA on a project's dataset")
    p.add_argument("project")
    p.add_argument("--base-model", help="SD1, SD2 or SDXL-family checkpoint (.safetensors or .ckpt; a .yaml beside it is used)")
    p.add_argument("--model-config", help="ldm/sgm .yaml for the checkpoint (default: beside it, or detected)")
    p.add_argument("--out", help="folder for the epoch files (default: <project>/output)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run (its id in <project>/runs/) with its own settings")
    p.add_argument("--force", action="store_true", help="with --resume: continue although the dataset or base model changed")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--weights", choices=DTYPES, help="dtype of the base weights (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--gpus", type=int, metavar="N",
                   help="train data-parallel on N GPUs of this machine (cuda:0…N-1; pick them with CUDA_VISIBLE_DEVICES), "
                        "each training the batch size; with --device cpu, N CPU processes")
    p.add_argument("--compile-blocks", action="store_true",
                   help="compile each UNet block with torch.compile (Inductor): fewer kernels per step, minutes of "
                        "compiling per bucket shape at the start; bench train --compile-blocks off,on measures both")
    add_a1111_dir(p)
    add_train_options(p)
    p.set_defaults(handler=run)


def _device_and_dtype(device: str, weights: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device torch knows; use cuda, cuda:N or cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU")
    if weights == "auto":
        weights = "fp16" if dev.type == "cuda" else "fp32"
    return dev, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[weights]


def _resolved(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


def _options(args, project, world) -> dict:
    return {
        "base_model": _resolved(args.base_model),
        "model_config": _resolved(args.model_config),
        "out": _resolved(args.out) or str(project.path / "output"),
        "device": args.device or "auto",
        "weights": args.weights or "auto",
        "processes": world.size,
    }


def _resume_options(args, point, world) -> dict:
    recorded = {"out": str(point.output_dir), "device": "auto", "weights": "auto", "model_config": None, "processes": 1,
                **(point.record.get("options") or {})}
    if recorded["processes"] != world.size:
        gpus = f"--gpus {recorded['processes']}" if recorded["processes"] > 1 else "one process (no --gpus)"
        raise UserError(f"run {point.run_dir.name} trained in {recorded['processes']} data-parallel process(es), this resume in "
                        f"{world.size}: its batches and random stream depend on that number; resume it with {gpus}")
    if not recorded.get("base_model"):
        # Started in A1111 on its loaded model: the file is whatever the user names; its hash is
        # checked against the record once loaded.
        if not args.base_model:
            raise UserError(f"run {point.run_dir.name} was trained on A1111's loaded model; resume it in the tab, "
                            "or give --base-model with that checkpoint file")
        recorded["base_model"] = _resolved(args.base_model)
    changed = [f"{flag} (the run has {recorded.get(key)!r})" for key, flag in _RECORDED.items()
               if getattr(args, key) is not None and _resolved_option(key, getattr(args, key)) != recorded.get(key)]
    changed += given_train_options(args)
    if changed:
        raise UserError(
            f"--resume continues run {point.run_dir.name} with the settings it started with; leave out "
            + ", ".join(changed) + ". To change them, start a new run"
        )
    return recorded


def _resolved_option(key: str, value: str) -> str:
    return _resolved(value) if key in ("base_model", "model_config", "out") else value


def run(args) -> Result:
    from lorakit_ext.cli.library_warmup import read_gpu_libraries_in_background
    from lorakit_ext.models.file_hashes import hashes_in_background

    # Several GB of CUDA libraries reach the page cache during the imports rather than by single
    # page faults in the first step. Ranks of --gpus find them read by the process that started them.
    if args.device != "cpu" and "WORLD_SIZE" not in os.environ:
        read_gpu_libraries_in_background()
    # The checkpoint's hashes go into every file's metadata; reading 2–7 GB for them overlaps
    # importing torch and checking the dataset. Ranks of --gpus hash when they load.
    checkpoint = Path(_resolved(args.base_model)) if args.base_model and not args.resume and args.gpus is None else None
    hashes = hashes_in_background(checkpoint) if checkpoint and checkpoint.is_file() else None
    import torch

    from lorakit_ext.models.sgm_import import use_a1111_model_code
    from lorakit_ext.train.data_parallel import World

    args.imported = time.perf_counter()
    project = open_project(args.root, args.project)
    if args.force and not args.resume:
        raise UserError("--force only goes with --resume")
    use_a1111_model_code(args.a1111_dir)
    if not args.resume and not args.base_model:
        raise UserError("--base-model is required to start a run (give the checkpoint to train on)")
    world = World.from_env()
    if args.gpus is not None and not world.distributed:
        from lorakit_ext.cli.ranks import launch_ranks

        return launch_ranks(args.argv, args.gpus)
    if args.gpus is not None and args.gpus != world.size:
        raise UserError(f"--gpus {args.gpus} differs from the WORLD_SIZE {world.size} this process was started with")
    with world.process_group(torch.device(world.device(args.device) or "cpu")):
        if not world.main:
            return _follow(args, project, world)
        with ProjectLock(project.path, "training (CLI)"):
            try:
                point, options, config, family = _settings(args, project, world)
                placement = _device_and_dtype(world.device(options["device"]), options["weights"])
                args.imported += import_training_stack(family)
                pre = _preflight(args, project, config, options, point, world, placement[0])
            except UserError as exc:
                world.broadcast(("error", str(exc)))
                raise
            world.broadcast(("ok", pre.output_stem, pre.fingerprint))
            return _train(args, project, config, options, pre, point, world, placement, hashes)


def _settings(args, project, world):
    """``(resume point or None, front-door options, TrainConfig, the checkpoint's family)`` of the
    run the arguments ask for; the family is None on a resume and for a missing file."""
    from lorakit_ext.train.resume import resume_point

    if args.resume:
        point = resume_point(project, args.resume)
        return point, _resume_options(args, point, world), point.config, None
    from lorakit_ext.models.checkpoint import family_of_checkpoint
    from lorakit_ext.models.families.sd1 import SD1

    options = _options(args, project, world)
    # The family's defaults apply; a missing file is reported when it loads, after the settings
    # and the dataset were checked.
    family = family_of_checkpoint(options["base_model"]) if Path(options["base_model"]).is_file() else None
    return None, options, config_from_args(args, family or SD1), family


def _preflight(args, project, config, options, point, world, device):
    from lorakit_ext.train.preflight import preflight
    from lorakit_ext.train.resume import check_unchanged

    stem = point.output_stem if point else None
    pre = preflight(project, config, Path(options["out"]), output_stem=stem, processes=world.size, device=device)
    if point:
        check_unchanged(point, fingerprint=pre.fingerprint, model_sha256=None, force=args.force)
    return pre


def _follow(args, project, world) -> Result:
    """A data-parallel rank other than 0: the run rank 0 checked, on the dataset it read."""
    from lorakit_ext.train.preflight import Preflight, dataset_schedule, schedule_fingerprint

    told = world.broadcast(None)
    if told[0] == "error":
        raise UserError(told[1])
    _, stem, fingerprint = told
    point, options, config, _ = _settings(args, project, world)
    data = dataset_schedule(config, project.dataset, world.size)
    if schedule_fingerprint(data) != fingerprint:
        raise UserError(f"rank {world.rank} read another dataset than rank 0 (it changed while the run started); start it again")
    placement = _device_and_dtype(world.device(options["device"]), options["weights"])
    return _train(args, project, config, options, Preflight(data, stem, fingerprint), point, world, placement)


def _train(args, project, config, options, pre, point, world, placement, hashes=None) -> Result:
    """``placement``: the ``(device, dtype)`` the model loads to, as the checks saw them."""
    from lorakit_ext.compare.epoch_report import report_lines
    from lorakit_ext.models.checkpoint import load_sd_checkpoint
    from lorakit_ext.models.families import adapter_for
    from lorakit_ext.train.events import Interrupted
    from lorakit_ext.train.gpu_memory import grow_segments_in_place
    from lorakit_ext.train.launch import BaseModel, open_run
    from lorakit_ext.train.loop import Trainer
    from lorakit_ext.train.resume import check_unchanged
    from lorakit_ext.train.sampling import sampling_on

    device, dtype = placement
    grow_segments_in_place(device)
    loading = time.perf_counter()
    loaded: dict[str, float] = {}
    sd_model, info = load_sd_checkpoint(options["base_model"], options["model_config"], device=device, dtype=dtype, hashes=hashes,
                                        phases=loaded)
    if point is not None:
        check_unchanged(point, fingerprint=pre.fingerprint, model_sha256=info.sha256, force=args.force)
    model = adapter_for(sd_model, clip_skip=config.clip_skip, max_token_length=config.max_token_length)
    base = BaseModel(Path(options["base_model"]).name, options["base_model"], info.legacy_hash, info.sha256)
    job = open_run(project, config, Path(options["out"]), pre, base, options=options, resume=point, world=world, patch_attention=True,
                   compile_blocks=args.compile_blocks)
    notice = "stopping after this step (Ctrl-C again to abort without saving)…" if world.main else ""
    try:
        with first_ctrl_c_stops(notice) as should_stop:
            sampler = None
            if sampling_on(config) and world.main:
                from lorakit_ext.compare.sample import headless_sampler

                sampler = headless_sampler(model, zero_terminal_snr=config.zero_terminal_snr)
            startup = {"imports": round(args.imported - args.started, 3), "checks": round(loading - args.imported, 3), **loaded}
            trainer = Trainer(model, job, on_progress=ProgressPrinter() if world.main else None, should_stop=should_stop, sampler=sampler,
                              phases=startup)
            result = trainer.run(point.state if point else None)
    except Interrupted as exc:
        if not world.main:
            return Result(exit_code=130)
        return _interrupted(project, job.run_dir, str(exc))
    if not world.main:
        return Result({"rank": world.rank, "steps": result.steps})
    files = [str(f) for f in result.files]
    report = _epoch_report(job.run_dir)
    phases = trainer.phases
    compare = f"python -m lorakit_ext compare {project.name} --root {project.root} --run {job.run_dir.name}"
    text = "\n".join(
        [f"trained {result.steps} steps; final loss {result.losses[-1]:.4f}" if result.losses else f"trained {result.steps} steps"]
        + [f"  {f}" for f in files]
        + [f"run record: {job.run_dir}", "start-up: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in phases.items()),
           *_pool_line(trainer.graph_pools),
           *report_lines(report),
           f"to see each epoch and check it for no effect or overcooking: {compare}"]
    )
    data = {"status": result.status, "files": files, "steps": result.steps, "run": job.run_dir.name, "run_dir": str(job.run_dir),
            "epochs": report["epochs"], "suggestion": report["suggestion"], "phases_s": phases, "graph_pools": trainer.graph_pools}
    return Result(data, text)


def _pool_line(pools: list[dict]) -> list[str]:
    if not pools:
        return []
    added = ", ".join(f"{'×'.join(map(str, p['latents']))} +{p['pool_added_gib']:.2f}" for p in pools)
    first = ", ".join(f"{p['warmup_s'][0]:.1f}" for p in pools if p["warmup_s"])
    return [f"CUDA graphs: {len(pools)} captured step(s) sharing one memory pool, GiB each added: {added}",
            f"  each one's first warm-up step, s (kernel choice, compiling): {first}"]


def _epoch_report(run_dir: Path) -> dict:
    """The validation-loss report of a finished run, kept in the run folder for the tab and
    ``compare`` (which adds what the grid shows)."""
    from lorakit_ext.compare.epoch_report import report_of_run, write_report
    from lorakit_ext.train.record import read_run

    report = report_of_run(read_run(run_dir))
    write_report(run_dir, report)
    return report


def _interrupted(project, run_dir: Path, reason: str) -> Result:
    from lorakit_ext.train.record import read_run

    data = {"status": "interrupted", "run": run_dir.name, "run_dir": str(run_dir)}
    if not read_run(run_dir).get("resumable"):
        text = f"interrupted before the first step ({reason}); nothing was trained, start the run again"
        return Result(data, text, ok=False, exit_code=130)
    resume = f"python -m lorakit_ext train {project.name} --root {project.root} --resume {run_dir.name}"
    return Result({**data, "resume": resume}, f"interrupted; state saved in {run_dir}\nresume with: {resume}", ok=False, exit_code=130)
