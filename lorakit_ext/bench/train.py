"""``bench train``: steady-state training speed, peak memory and time to the first step.

It runs the real :class:`~lorakit_ext.train.loop.Trainer` — the same code path as the CLI and the
A1111 tab — on a random-initialised full-size model (no weights needed: throughput does not depend
on weight values) and a synthetic dataset. ``--family sd1`` (the default) trains SD1.5 at the
kohya-colab settings (512², batch 2, dim 16 / alpha 8, TE + UNet); ``--family sdxl`` trains SDXL
base at 1024², the UNet alone on cached text-encoder outputs, batches 1 and 4
(:mod:`lorakit_ext.bench.models` holds each family's model and defaults). kohya sd-scripts' SD1.5
figures recorded on one H200 are printed beside ours; ``bench train --kohya-sd-scripts DIR`` runs
kohya's matching rows on this machine first and compares in the same run
(:mod:`lorakit_ext.bench.kohya`). ``--memory-budget-gib`` caps our process's CUDA memory to show what
fits a smaller GPU; a row that runs out of it is reported as such. ``--gpus 1,2`` trains every row
data-parallel in each of those numbers of processes, one GPU each
(:mod:`lorakit_ext.bench.train_ranks`).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lorakit_ext.cli.a1111_dir import add_a1111_dir
from lorakit_ext.bench.kohya import kohya_rows
from lorakit_ext.bench.models import FAMILIES, BenchFamily
from lorakit_ext.bench.smi import SmiPeak
from lorakit_ext.bench.train_report import report
from lorakit_ext.caption.runner import is_out_of_memory
from lorakit_ext.errors import UserError
from lorakit_ext.train.data_parallel import World
from lorakit_ext.train.precision import resolve_precision

WEIGHTS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SWITCH = {"off": False, "on": True}


def add_arguments(p) -> None:
    p.add_argument("--family", choices=sorted(FAMILIES), default="sd1",
                   help="sd1: full-size SD1.5 (default); sdxl: full-size SDXL base (sgm: --a1111-dir or LORAKIT_SGM_DIR)")
    add_a1111_dir(p)
    p.add_argument("--batch", default=None, help="batch size(s), comma-separated (default: sd1 2, sdxl 1,4)")
    p.add_argument("--train", default=None, help="te (TE + UNet), unet (UNet only) or both: te,unet (default: sd1 te, sdxl unet)")
    p.add_argument("--cache-text-encoder-outputs", action=argparse.BooleanOptionalAction, default=None,
                   help="UNet-only rows train on text-encoder outputs encoded once, encoders off the GPU, no tag shuffling "
                        "(default: on for sdxl, off for sd1)")
    p.add_argument("--weights", default=None, help="base weight dtype(s): fp32, fp16, bf16, comma-separated (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "no"), default="auto", help="mixed precision (default auto)")
    p.add_argument("--steps", type=int, default=60, help="steps measured after warm-up (default 60)")
    p.add_argument("--warmup", type=int, default=10, help="steps not measured (default 10)")
    p.add_argument("--images", type=int, default=126, help="synthetic dataset size (default 126, as the seed's)")
    p.add_argument("--resolution", type=int, default=None, help="training resolution (default: sd1 512, sdxl 1024)")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--gradient-checkpointing", nargs="?", const="on", default="off", metavar="off,on",
                   help="off, on or both: off,on (given alone: on; default off)")
    p.add_argument("--channels-last", default="auto", help="auto, on, off or a list: UNet weights and latents in channels_last (default auto: on CUDA)")
    p.add_argument("--compile-blocks", default="off", metavar="off,on",
                   help="off, on or both: each UNet block compiled with torch.compile (train --compile-blocks); the "
                        "rows' first-step and per-shape warm-up columns show what compiling costs (default off)")
    p.add_argument("--modes", default="graphs,eager", help="graphs, eager or both (default both: the eager row is the same-run reference)")
    p.add_argument("--memory-budget-gib", type=float, metavar="N", default=None,
                   help="CUDA only: cap this process's torch allocator at N GiB (torch.cuda.set_per_process_memory_fraction) to "
                        "show what fits a smaller GPU; a row that runs out is reported as such. kohya's rows run uncapped")
    p.add_argument("--tiny", action="store_true", help="the family's tiny test model instead of the full-size one (a CPU smoke run)")
    p.add_argument("--device", default="auto")
    p.add_argument("--kohya-sd-scripts", metavar="DIR", default=None,
                   help="a kohya-ss/sd-scripts checkout: run the family's training script (train_network.py, "
                        "sdxl_train_network.py) on the matching rows first, at the same settings, and compare in the same run")
    p.add_argument("--kohya-python", metavar="PYTHON", default=sys.executable,
                   help="the Python whose packages run sd-scripts (default: this one)")
    p.add_argument("--kernel-breakdown", action="store_true",
                   help="after each row, profile a few eager steps of it: device time per step by kind (GEMM, attention, "
                        "convolution, norm, optimizer, elementwise/copy/cast), the floor a captured step can reach")
    p.add_argument("--gpus", metavar="N,…", default=None,
                   help="numbers of GPUs, e.g. 1,2: every row trains data-parallel in that many processes (batch per GPU; "
                        "img/s counts all GPUs), started as torchrun would")


def _dataset(project, images: int, resolution: int) -> None:
    rng = np.random.default_rng(0)
    # A few distinct pictures repeated under other names: decoding stays cheap, latents differ
    # enough for a realistic step, and every image lands in the square bucket like kohya's bench.
    base = [Image.fromarray(rng.integers(0, 256, (resolution // 8, resolution // 8, 3), dtype=np.uint8)).resize((resolution, resolution)) for _ in range(8)]
    for i in range(images):
        base[i % len(base)].save(project.dataset / f"{i:04d}.png", compress_level=1)
        (project.dataset / f"{i:04d}.txt").write_text(f"kat3r1na, tag{i % 7}, tag{i % 5}, 1girl, red hair")


def bench_config(args, *, batch: int, unet_only: bool, checkpointing: bool, graphs: bool = True):
    """The settings of one row; kohya's row runs the same ones."""
    from lorakit_ext.train_config import TrainConfig

    total = args.warmup + args.steps
    # Cached outputs are right only while every step would encode the same captions with frozen encoders.
    cached = args.cache_text_encoder_outputs and unet_only
    return TrainConfig(
        **FAMILIES[args.family].settings,
        resolution=args.resolution, min_bucket_reso=min(256, args.resolution), max_bucket_reso=max(1024, args.resolution),
        num_repeats=max(1, -(-total * batch // args.images)), train_batch_size=batch, max_train_epochs=1,
        max_train_steps=total, network_dim=args.dim, network_alpha=args.alpha, optimizer="AdamW",
        text_encoder_lr=0.0 if unet_only else 1e-4, cache_text_encoder_outputs=cached, shuffle_tags=not cached,
        mixed_precision=args.precision, gradient_checkpointing=checkpointing, keep_only_last_n_epochs=0,
        save_every_n_epochs=1000, cuda_graphs=graphs,
        # kohya's row neither holds images out nor measures a validation loss: so that both train the
        # same images and the memory peaks cover the same work, ours does neither either.
        validation_split=0.0, validate_every_n_epochs=0,
    ).validate()


@dataclass(frozen=True)
class RowSpec:
    weights: str
    train: str  # "te" (TE + UNet) or "unet"
    batch: int
    checkpointing: bool
    mode: str  # "graphs" or "eager"
    layout: str  # channels_last: auto, on or off
    compiled: bool = False  # the UNet's blocks compiled (models.compiled_blocks)

    @property
    def unet_only(self) -> bool:
        return self.train == "unet"

    @property
    def kohya_key(self) -> tuple[str, int, bool]:
        return self.train, self.batch, self.checkpointing

    @property
    def name(self) -> str:
        compiled = "-compiled" if self.compiled else ""
        return f"{self.weights}-{self.train}-b{self.batch}-{'gc' if self.checkpointing else 'nogc'}-{self.mode}-{self.layout}{compiled}"


def _peak_memory_columns(device: torch.device, smi: SmiPeak) -> dict:
    if device.type != "cuda":
        return {}
    row = {
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
    }
    if smi.peak_mib is not None:
        row["smi_peak_gib"] = smi.peak_mib / 1024
    return row


def _kohya_columns(args, family: BenchFamily, spec: RowSpec, it_s: float | None, kohya: dict | None) -> dict:
    if kohya:
        row = {"kohya_record": kohya, "kohya_same_run": True, "kohya_it_per_s": kohya["it_s"], "kohya_first_step_s": kohya["first_step_s"]}
        if "smi_peak_mem_MiB" in kohya:
            row["kohya_smi_peak_gib"] = kohya["smi_peak_mem_MiB"] / 1024
        if "torch_max_memory_reserved_GiB" in kohya:
            row["kohya_peak_reserved_gib"] = kohya["torch_max_memory_reserved_GiB"]
    elif not args.tiny and not spec.checkpointing and (recorded := family.kohya_h200.get((spec.train, spec.batch))):
        row = {"kohya_same_run": False, "kohya_it_per_s": recorded}
    else:
        return {}
    if it_s is not None:
        row["ratio_vs_kohya"] = it_s / row["kohya_it_per_s"]
    return row


def _measure(sd_model, project, args, spec: RowSpec, *, device, kohya: dict | None, world: World = World()) -> dict:
    """One Trainer run: ``warmup`` steps unmeasured, then ``steps`` timed between two syncs."""
    from lorakit_ext.models.families import adapter_for
    from lorakit_ext.train.loop import Trainer

    total = args.warmup + args.steps
    config = bench_config(args, batch=spec.batch, unet_only=spec.unet_only, checkpointing=spec.checkpointing, graphs=spec.mode == "graphs")
    model = adapter_for(sd_model, clip_skip=config.clip_skip, max_token_length=config.max_token_length)
    marks: dict[str, float] = {}

    def on_progress(p) -> None:
        if p.message.startswith("CUDA graphs off"):
            marks.setdefault("messages", []).append(p.message)
        if p.phase != "training" or p.message:
            return
        if p.step == 1:
            marks["first_step"] = time.perf_counter()
        if p.step in (args.warmup, total):
            if device.type == "cuda":
                torch.cuda.synchronize()
            marks[f"step{p.step}"] = time.perf_counter()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    job = _row_job(config, project, spec.name, spec, world)
    trainer = Trainer(model, job, on_progress=on_progress)
    # As the trainer resolves it, known also when a row runs out of memory before resolving it.
    precision = resolve_precision(config.mixed_precision, device, next(model.unet.parameters()).dtype)
    started = time.perf_counter()
    result = None
    with SmiPeak(device) as smi:
        try:
            result = trainer.run()
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
    row = {
        "weights": spec.weights,
        "mode": "graphs" if spec.mode == "graphs" and device.type == "cuda" and not marks.get("messages") else "eager",
        "notes": marks.get("messages", []),
        "train": "UNet only" if spec.unet_only else "TE + UNet",
        "text_encoder_outputs_cached": config.cache_text_encoder_outputs,
        "gradient_checkpointing": spec.checkpointing,
        "channels_last": spec.layout,
        "compiled_blocks": spec.compiled,
        "batch": spec.batch,
        "processes": world.size,
        "precision": precision.name,
        "out_of_memory": result is None,
        **_peak_memory_columns(device, smi),
    }
    it_s = None
    if result is None:
        # The failed step's tensors are unreachable now; hand them back before the next row.
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        it_s = args.steps / (marks[f"step{total}"] - marks[f"step{args.warmup}"])
        row.update(it_per_s=it_s, images_per_s=it_s * spec.batch * world.size, start_to_first_step_s=marks["first_step"] - started,
                   final_loss=result.losses[-1], graph_warmup_s=[p["warmup_s"] for p in trainer.graph_pools],
                   phases_s=trainer.phases, memory_peaks_gib=trainer.memory_peaks, graph_pools=trainer.graph_pools)
    print(row_done_line(row, spec), file=sys.stderr, flush=True)
    if args.kernel_breakdown and result is not None:
        row["kernels"] = _kernel_breakdown(model, project, args, spec, world)
    return {**row, **_kohya_columns(args, FAMILIES[args.family], spec, it_s, kohya)}


def _row_job(config, project, name: str, spec: RowSpec, world: World):
    """A run of ``config`` in folders of its own (``name``): LoRA Kit never replaces an epoch file
    another run wrote."""
    from lorakit_ext.train.loop import TrainJob

    job = TrainJob(config, project, project.path / "out" / name, project.runs / name, patch_attention=True,
                   channels_last={"auto": None, "on": True, "off": False}[spec.layout], compile_blocks=spec.compiled, world=world)
    job.run_dir.mkdir(parents=True)
    return job


def _kernel_breakdown(model, project, args, spec: RowSpec, world: World) -> dict:
    """Steps 5 to 8 of the row's settings, run eagerly under the profiler (kernel_profile)."""
    from lorakit_ext.bench.kernel_profile import StepProfiler
    from lorakit_ext.train.loop import Trainer

    config = bench_config(args, batch=spec.batch, unet_only=spec.unet_only, checkpointing=spec.checkpointing, graphs=False)
    config = config.replace(max_train_steps=8)
    job = _row_job(config, project, f"{spec.name}-profile", spec, world)
    profiler = StepProfiler(model.device, 4, 8)
    Trainer(model, job, on_progress=profiler).run()
    return profiler.result


def _list(value: str, allowed=None) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if allowed is not None and v not in allowed]
    if not items or bad:
        raise UserError(f"expected a comma-separated list of {', '.join(allowed or ['values'])}, got {value!r}")
    return items


def _apply_family_defaults(args) -> None:
    """Fills the options left unset with the family's defaults, and refuses what contradicts them."""
    defaults = FAMILIES[args.family].defaults
    if args.cache_text_encoder_outputs and "te" in _list(args.train or defaults["train"], ("te", "unet")):
        raise UserError("--cache-text-encoder-outputs needs frozen text encoders: use --train unet, or leave caching "
                        "to its default (UNet-only rows only)")
    for name in ("resolution", "train", "batch", "cache_text_encoder_outputs"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])


def _memory_fraction(device: torch.device, budget_gib: float | None) -> float | None:
    """The share of the GPU that ``--memory-budget-gib`` allows; ``UserError`` where it cannot apply."""
    if budget_gib is None:
        return None
    if device.type != "cuda":
        raise UserError(f"--memory-budget-gib caps CUDA memory, and this run is on the {device.type}; use it with a CUDA device")
    total = torch.cuda.get_device_properties(device).total_memory
    if not 0 < budget_gib * 2**30 <= total:
        raise UserError(f"--memory-budget-gib {budget_gib:g} must lie above 0 and within this GPU's {total / 2**30:.1f} GiB")
    return budget_gib * 2**30 / total


def row_done_line(row: dict, spec: RowSpec) -> str:
    """What a row says once measured, before its kernel breakdown (which compiles again with
    ``--compile-blocks``) and the report: a bench cut short (minutes of compiling, a time limit)
    still tells what it measured. The first warm-up step of each captured shape is where a
    compile's time shows."""
    if row["out_of_memory"]:
        return f"row {spec.name}: out of memory"
    firsts = ", ".join(f"{steps[0]:.1f}" for steps in row["graph_warmup_s"] if steps)
    return f"row {spec.name}: {row['it_per_s']:.2f} it/s" + (f", first warm-up step per captured shape {firsts} s" if firsts else "")


def run_bench(args) -> dict:
    """The rows of this process (of this rank, under ``--gpus``)."""
    family = FAMILIES[args.family]
    world = World.from_env()
    asked = world.device(None if args.device == "auto" else args.device)
    device = torch.device(asked or ("cuda" if torch.cuda.is_available() else "cpu"))
    with world.process_group(device):
        return _run_rows(args, family, device, world)


def _run_rows(args, family: BenchFamily, device: torch.device, world: World) -> dict:
    from lorakit_ext.models.checkpoint import place_model
    from lorakit_ext.train.gpu_memory import cuda_index, grow_segments_in_place
    from lorakit_ext.project import create_project

    weights = _list(args.weights or ("fp16" if device.type == "cuda" else "fp32"), WEIGHTS)
    batches = [int(b) for b in _list(args.batch)]
    trains = _list(args.train, ("te", "unet"))
    checkpointing = [SWITCH[c] for c in _list(args.gradient_checkpointing, SWITCH)]
    modes = _list(args.modes, ("graphs", "eager"))
    layouts = _list(args.channels_last, ("auto", "on", "off"))
    compiling = [SWITCH[c] for c in _list(args.compile_blocks, SWITCH)]
    fraction = _memory_fraction(device, args.memory_budget_gib)
    if device.type != "cuda":
        modes = ["eager"]  # CUDA graphs exist only on CUDA: a "graphs" row would repeat the eager one
    kohya, notes = {}, []
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        project = create_project(Path(tmp), "bench")
        _dataset(project, args.images, args.resolution)
        if args.kohya_sd_scripts and world.distributed:
            notes.append("kohya's rows run with --gpus left out: its several-GPU runs need accelerate's own launcher")
        elif args.kohya_sd_scripts:
            # Before this process touches the GPU: kohya's nvidia-smi peak must be kohya's alone.
            configs = {(t, b, c): bench_config(args, batch=b, unet_only=t == "unet", checkpointing=c)
                       for t in trains for b in batches for c in checkpointing}
            precision = resolve_precision(args.precision, device, WEIGHTS[weights[0]]).name
            kohya, notes = kohya_rows(args.kohya_sd_scripts, args.kohya_python, configs, project.dataset, family=family,
                                      precision=precision, warmup=args.warmup)
            if args.tiny:
                notes.append(f"--tiny: our rows ran the tiny model, kohya's the full-size {family.label} it can load; the ratios compare different models")
        if fraction is not None:
            torch.cuda.set_per_process_memory_fraction(fraction, cuda_index(device))
        # As a headless run does; after kohya's rows, which keep torch's default allocator.
        expandable = grow_segments_in_place(device)
        t0 = time.perf_counter()
        sd_model = family.build(device, WEIGHTS[weights[0]], not args.tiny)
        build_s = time.perf_counter() - t0
        for w in weights:
            place_model(sd_model, device, WEIGHTS[w])
            for train, batch, gc_on, mode, layout, compiled in itertools.product(trains, batches, checkpointing, modes, layouts, compiling):
                spec = RowSpec(w, train, batch, gc_on, mode, layout, compiled)
                rows.append(_measure(sd_model, project, args, spec, device=device, kohya=kohya.get(spec.kohya_key), world=world))
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "family": family.name,
        "model": f"tiny {family.label} layout" if args.tiny else f"{family.label} full size, random weights",
        "resolution": args.resolution,
        "images": args.images,
        "memory_budget_gib": args.memory_budget_gib,
        "expandable_segments": expandable,
        "model_build_s": build_s,
        "rows": rows,
        "processes": world.size,
        "kohya_script": family.family.kohya_script,
        "kohya_notes": notes,
    }


def run_cli(args):
    from lorakit_ext.models.sgm_import import use_a1111_model_code

    if args.steps < 1 or args.warmup < 1:
        raise UserError("--steps and --warmup must be at least 1")
    use_a1111_model_code(args.a1111_dir)
    _apply_family_defaults(args)
    if args.gpus and not World.from_env().distributed:
        from lorakit_ext.bench.train_ranks import run_world_sizes

        figures = run_world_sizes(args)
    else:
        figures = run_bench(args)
    return figures, report(figures, args)


BENCH_CLI = {"train": (add_arguments, run_cli)}
