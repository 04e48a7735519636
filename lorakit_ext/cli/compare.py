"""``compare PROJECT``: a run's epochs × seeds grid drawn headless, each epoch measured against
the no-LoRA images and the training images, and the suggested epoch — the tab's Compare step
without A1111. The report lands in the run folder as ``epochs.json`` beside ``grid.png``."""

from __future__ import annotations

from pathlib import Path

from lorakit_ext.cli.a1111_dir import add_a1111_dir
from lorakit_ext.cli.output import Result
from lorakit_ext.errors import UserError
from lorakit_ext.project import open_project

GRID_FILE = "grid.png"


def register(sub, common) -> None:
    p = sub.add_parser("compare", parents=[common], help="grid a run's epochs, flag weak or overcooked ones, suggest the best")
    p.add_argument("project")
    p.add_argument("--run", help="the run's id in <project>/runs/ (default: the newest finished run)")
    p.add_argument("--base-model", help="the checkpoint to sample on (default: the one the run trained on)")
    p.add_argument("--model-config", help="ldm/sgm .yaml for the checkpoint (default: beside it, or detected)")
    add_a1111_dir(p)
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: the run's, else cuda when available)")
    p.add_argument("--prompt", help="test prompt (default: the trigger and the dataset's most common tags)")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--seeds", default="1,2", help="comma-separated seeds, one grid row each (default: 1,2)")
    p.add_argument("--size", type=int, help="image side in pixels (default: the run's training resolution)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps per image (default: 20)")
    p.add_argument("--no-grid", action="store_true", help="only the validation losses: no images are drawn")
    p.add_argument("--clip-likeness", action="store_true",
                   help="also measure each epoch's likeness to the training images with a CLIP model already on this machine "
                        "(LORAKIT_CLIP_MODEL, or openai/clip-vit-large-patch14 in the Hugging Face cache); never downloads")
    p.set_defaults(handler=run)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r} is not a comma-separated list of whole numbers, e.g. 1,2") from None
    if not seeds:
        raise UserError("--seeds names no seed; give e.g. 1,2")
    return seeds


def _newest_finished(project) -> str:
    from lorakit_ext.train.record import list_runs

    finished = [r["run"] for r in list_runs(project) if r["status"] == "finished"]
    if not finished:
        raise UserError(f"project {project.name} has no finished run to compare; train one first")
    return finished[0]


def _default_prompt(project, trigger: str) -> str:
    from lorakit_ext.dataset.captions import load_captions
    from lorakit_ext.dataset.tags import typical_prompt

    return typical_prompt(load_captions(project).values(), trigger)


def run(args) -> Result:
    from lorakit_ext.compare.epoch_report import read_report, report_lines, report_of_run, write_report
    from lorakit_ext.compare.grid import grid_of_cells
    from lorakit_ext.fsutil import atomic_write_bytes
    from lorakit_ext.train.record import find_run_dir, read_run

    project = open_project(args.root, args.project)
    if args.clip_likeness and args.no_grid:
        raise UserError("--clip-likeness measures the grid's images; leave out --no-grid")
    clip_folder = _clip_folder() if args.clip_likeness else None  # before anything is drawn
    run_dir = find_run_dir(project, args.run or _newest_finished(project))
    record = read_run(run_dir)
    files = [Path(f) for f in record.get("files", []) if Path(f).is_file()]
    if not files:
        raise UserError(f"run {run_dir.name} has no epoch files left to compare")
    grid = None
    if args.no_grid:
        report = report_of_run(record)
        previous = read_report(run_dir)
        if previous and previous.get("grid_measured"):
            report = previous  # --no-grid keeps the measured report rather than a poorer one
    else:
        plan, cells, measures = _measure(args, project, run_dir, record, files, clip_folder)
        report = report_of_run(record, measures)
        grid = run_dir / GRID_FILE
        image = grid_of_cells(plan, cells, marked=report["suggestion"]["label"])
        atomic_write_bytes(grid, _png(image))
    path = write_report(run_dir, report)
    lines = report_lines(report) + ([f"grid: {grid}"] if grid else []) + [f"report: {path}"]
    return Result({**report, "run": run_dir.name, "grid": str(grid) if grid else None, "report": str(path)}, "\n".join(lines))


def _measure(args, project, run_dir: Path, record: dict, files: list[Path], clip_folder: str | None):
    from lorakit_ext.cli.train import _device_and_dtype
    from lorakit_ext.compare.epoch_report import measure_grid, training_thumbnails
    from lorakit_ext.compare.grid import epoch_grid_plan, render_epoch_cells
    from lorakit_ext.models.checkpoint import load_sd_checkpoint
    from lorakit_ext.models.families import adapter_for
    from lorakit_ext.models.sgm_import import use_a1111_model_code
    from lorakit_ext.train_config import TrainConfig

    use_a1111_model_code(args.a1111_dir)
    options = record.get("options") or {}
    base_model = args.base_model or options.get("base_model")
    if not base_model:
        raise UserError(f"run {run_dir.name} was trained on A1111's loaded model; give --base-model with that checkpoint")
    config = TrainConfig.from_dict(read_json(run_dir / "config.json"))
    seeds = _seeds(args.seeds)
    size = args.size or config.resolution
    device, dtype = _device_and_dtype(args.device or options.get("device", "auto"), options.get("weights", "auto"))
    sd_model, _ = load_sd_checkpoint(base_model, args.model_config or options.get("model_config"), device=device, dtype=dtype)
    model = adapter_for(sd_model, clip_skip=config.clip_skip, max_token_length=config.max_token_length)
    plan = epoch_grid_plan(files, seeds)
    prompt = args.prompt or _default_prompt(project, config.trigger)
    cells = render_epoch_cells(model, plan, prompt, negative=args.negative, size=(size, size), steps=args.steps,
                               zero_terminal_snr=config.zero_terminal_snr)
    embed = None
    if clip_folder is not None:
        from lorakit_ext.compare.clip_likeness import ClipEmbedder

        embed = ClipEmbedder(clip_folder, device)
    try:
        return plan, cells, measure_grid(cells, plan.columns[0][0], training_thumbnails(project.dataset), embed)
    finally:
        if embed is not None:
            embed.release()


def _clip_folder() -> str:
    from lorakit_ext.compare.clip_likeness import CLIP_HUB_ID, local_clip_model

    folder = local_clip_model()
    if folder is None:
        raise UserError(f"--clip-likeness found no CLIP model on this machine (LoRA Kit never downloads one): set "
                        f"LORAKIT_CLIP_MODEL to a transformers CLIP folder, or have {CLIP_HUB_ID} in the Hugging Face cache")
    return folder


def read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} ({exc}); the run folder is incomplete") from None


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
