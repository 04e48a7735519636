"""The whole LoRA Kit pipeline on the built-in demo data, headless and offline.

import → dedupe → lint → tag curation → plan → train a tiny SD1.5-layout model (random weights,
built here) → epoch files → a comparison grid. Every step prints where its output went.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lorakit_ext.dataset.captions import load_captions
from lorakit_ext.dataset.curation import CurationSummary, apply_tag_ops
from lorakit_ext.dataset.dedupe import apply_plan, plan_dedupe
from lorakit_ext.dataset.importer import import_folder
from lorakit_ext.dataset.tags import TagOps, lint_captions, tag_counts
from lorakit_ext.demo.synth import make_demo_set
from lorakit_ext.project import create_project, list_projects
from lorakit_ext.train.plan import plan_for
from lorakit_ext.train_config import TrainConfig

TRIGGER = "kat3r1na"
# Small enough to train on a laptop CPU in about a minute; the pipeline is the real one.
DEMO_TRAINING = dict(
    resolution=128, min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=64, num_repeats=2,
    max_train_epochs=3, train_batch_size=2, network_dim=4, network_alpha=2.0, unet_lr=1e-3,
    text_encoder_lr=1e-4, optimizer="AdamW", trigger=TRIGGER, keep_only_last_n_epochs=3,
)


@dataclass
class DemoResult:
    project: Path
    source: Path
    imported: int
    rejected: list[tuple[str, str]]
    removed: list[str]
    captions_changed: int
    plan: list[str]
    files: list[Path] = field(default_factory=list)
    grid: Path | None = None
    run_dir: Path | None = None


def _free_project_name(root: Path, base: str) -> str:
    taken = set(list_projects(root))
    name, n = base, 1
    while name in taken or (root / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def run_demo(root: Path, *, train: bool = True, say: Callable[[str], None] = print) -> DemoResult:
    root = Path(root).resolve()
    source = root / "demo-source"
    demo = make_demo_set(source, trigger=TRIGGER)
    say(f"1. demo photos written to {source} ({len(demo.images)} pictures, {len(demo.near_duplicates)} near-duplicates, {len(demo.broken)} broken files)")

    project = create_project(root, _free_project_name(root, "kat3r1na-demo"))
    report = import_folder(project, source)
    rejected = [(Path(r.source).name, r.reason) for r in report.rejected]
    say(f"2. imported {len(report.imported)} images into {project.dataset}; rejected {len(rejected)}:")
    for name, reason in rejected:
        say(f"     {name}: {reason}")

    plan = plan_dedupe(project)
    removed = [name for cluster in plan.clusters for name in cluster.remove]
    if removed:
        batch = apply_plan(project, plan)
        say(f"3. {len(plan.clusters)} near-duplicate clusters; moved {len(removed)} extra copies to {batch.folder} (undo: python -m lorakit_ext undo {project.name} {batch.id})")
    else:
        say("3. no near-duplicates found")

    lint = lint_captions(load_captions(project), TRIGGER)
    say(f"4. caption lint before curation: {len(lint.missing_trigger)} without the trigger, {len(lint.empty)} empty")
    changes = apply_tag_ops(project, TagOps(dedupe=True, trigger=TRIGGER))
    say(f"5. tag curation (dedupe, '{TRIGGER}' first): {CurationSummary.of(changes, False).text()}")
    top = ", ".join(f"{tag} ({n})" for tag, n in tag_counts(load_captions(project).values())[:6])
    say(f"   most common tags: {top}")

    config = TrainConfig(**DEMO_TRAINING).validate()
    images = len(load_captions(project))
    lines = plan_for(config, images).lines
    say("6. plan:\n   " + "\n   ".join(lines))
    result = DemoResult(project.path, source, len(report.imported), rejected, removed, len(changes), lines)
    if train:
        _train_and_compare(root, project, config, result, say)
    return result


def _train_and_compare(root: Path, project, config, result: DemoResult, say) -> None:
    from lorakit_ext.cli.progress import ProgressPrinter
    from lorakit_ext.compare.epoch_report import measure_grid, report_lines, report_of_run, training_thumbnails, write_report
    from lorakit_ext.compare.grid import epoch_grid_plan, grid_of_cells, render_epoch_cells
    from lorakit_ext.models.checkpoint import load_sd_checkpoint
    from lorakit_ext.models.families import adapter_for
    from lorakit_ext.models.tiny import build_tiny_sd15
    from lorakit_ext.project_lock import ProjectLock
    from lorakit_ext.train.launch import BaseModel, open_run
    from lorakit_ext.train.loop import Trainer
    from lorakit_ext.train.preflight import preflight
    from lorakit_ext.train.record import read_run

    checkpoint = build_tiny_sd15(root / "models")
    sd_model, info = load_sd_checkpoint(checkpoint)
    say(f"7. built a tiny SD1.5-layout model (random weights) at {checkpoint}")
    model = adapter_for(sd_model, clip_skip=config.clip_skip, max_token_length=config.max_token_length)
    base = BaseModel(checkpoint.name, str(checkpoint.resolve()), info.legacy_hash, info.sha256)
    with ProjectLock(project.path, "the demo"):
        pre = preflight(project, config, project.path / "output")
        job = open_run(project, config, project.path / "output", pre, base, patch_attention=True)
        run = Trainer(model, job, on_progress=ProgressPrinter(interval=5.0)).run()
    result.files, result.run_dir = run.files, run.run_dir
    say(f"8. trained {run.steps} steps (loss {run.losses[0]:.3f} → {run.losses[-1]:.3f}); epoch files:")
    for path in run.files:
        say(f"     {path}")
    say(f"   run record (config, plan, loss.csv, kohya_config.toml, resumable state): {run.run_dir}")
    prompt = f"{TRIGGER}, 1girl, red hair, smile"
    plan = epoch_grid_plan(run.files, seeds=[1, 2])
    cells = render_epoch_cells(model, plan, prompt, size=(128, 128), steps=12)
    report = report_of_run(read_run(run.run_dir), measure_grid(cells, plan.columns[0][0], training_thumbnails(project.dataset)))
    write_report(run.run_dir, report)
    result.grid = run.run_dir / "grid.png"
    grid_of_cells(plan, cells, marked=report["suggestion"]["label"]).save(result.grid)
    say(f"9. comparison grid (no LoRA + each epoch × 2 seeds, prompt '{prompt}'): {result.grid}")
    say("10. the epochs measured (the demo's model has random weights, so expect little effect):\n   "
        + "\n   ".join(report_lines(report)))
