"""``bench train``: steady-state training speed, peak memory and time to the first step.

It runs the real :class:`~lorakit_ext.train.loop.Trainer` — the same code path as the CLI and the
A1111 tab — on a random-initialised full-size SD1.5 (no weights needed: throughput does not depend
on weight values) and a synthetic dataset, at the kohya-colab settings by default (512², batch 2,
dim 16 / alpha 8, TE + UNet). kohya sd-scripts' figures recorded on one H200 are printed beside
ours; ``bench train --kohya-sd-scripts DIR`` runs kohya's matching rows on this machine first and
compares in the same run (:mod:`lorakit_ext.bench.kohya`).
"""

from __future__ import annotations

import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lorakit_ext.bench.kohya import kohya_rows
from lorakit_ext.bench.smi import SmiPeak
from lorakit_ext.errors import UserError
from lorakit_ext.train.precision import resolve_precision

# kohya sd-scripts 48d368f alone on one H200 (bf16, SDPA, cached latents, 300 steps), steady-state it/s.
KOHYA_H200 = {("te", 2): 3.46, ("unet", 2): 4.38, ("unet", 8): 4.91}
WEIGHTS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_arguments(p) -> None:
    p.add_argument("--batch", default="2", help="batch size(s), comma-separated (default 2)")
    p.add_argument("--train", default="te", help="te (TE + UNet), unet (UNet only) or both: te,unet (default te)")
    p.add_argument("--weights", default=None, help="base weight dtype(s): fp32, fp16, bf16, comma-separated (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "no"), default="auto", help="mixed precision (default auto)")
    p.add_argument("--steps", type=int, default=60, help="steps measured after warm-up (default 60)")
    p.add_argument("--warmup", type=int, default=10, help="steps not measured (default 10)")
    p.add_argument("--images", type=int, default=126, help="synthetic dataset size (default 126, as the seed's)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--channels-last", default="auto", help="auto, on, off or a list: UNet weights and latents in channels_last (default auto: on CUDA)")
    p.add_argument("--modes", default="graphs,eager", help="graphs, eager or both (default both: the eager row is the same-run reference)")
    p.add_argument("--tiny", action="store_true", help="the tiny test model instead of full-size SD1.5 (a CPU smoke run)")
    p.add_argument("--device", default="auto")
    p.add_argument("--kohya-sd-scripts", metavar="DIR", default=None,
                   help="a kohya-ss/sd-scripts checkout: run its train_network.py on the matching rows first, at the same settings, and compare in the same run")
    p.add_argument("--kohya-python", metavar="PYTHON", default=sys.executable,
                   help="the Python whose packages run sd-scripts (default: this one)")


def _dataset(project, images: int, resolution: int) -> None:
    rng = np.random.default_rng(0)
    # A few distinct pictures repeated under other names: decoding stays cheap, latents differ
    # enough for a realistic step, and every image lands in the square bucket like kohya's bench.
    base = [Image.fromarray(rng.integers(0, 256, (resolution // 8, resolution // 8, 3), dtype=np.uint8)).resize((resolution, resolution)) for _ in range(8)]
    for i in range(images):
        base[i % len(base)].save(project.dataset / f"{i:04d}.png", compress_level=1)
        (project.dataset / f"{i:04d}.txt").write_text(f"kat3r1na, tag{i % 7}, tag{i % 5}, 1girl, red hair")


def _model(tiny: bool, device: torch.device, dtype: torch.dtype, folder: Path):
    if tiny:
        from lorakit_ext.models.checkpoint import load_sd_checkpoint
        from lorakit_ext.models.tiny import build_tiny_sd15

        model, _ = load_sd_checkpoint(build_tiny_sd15(folder / "tiny"), device=device, dtype=dtype)
        return model
    from lorakit_ext.models.tiny import build_random_sd15

    return build_random_sd15(device, dtype, full=True)


def bench_config(args, *, batch: int, unet_only: bool, graphs: bool = True):
    """The settings of one row; kohya's row runs the same ones."""
    from lorakit_ext.train_config import TrainConfig

    total = args.warmup + args.steps
    return TrainConfig(
        resolution=args.resolution, min_bucket_reso=min(256, args.resolution), max_bucket_reso=max(1024, args.resolution),
        num_repeats=max(1, -(-total * batch // args.images)), train_batch_size=batch, max_train_epochs=1,
        max_train_steps=total, network_dim=args.dim, network_alpha=args.alpha, optimizer="AdamW",
        text_encoder_lr=0.0 if unet_only else 1e-4, mixed_precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing, keep_only_last_n_epochs=0, save_every_n_epochs=1000,
        cuda_graphs=graphs,
    ).validate()


def _measure(sd_model, project, run_name: str, args, *, batch: int, unet_only: bool, device, graphs: bool, layout: str, kohya: dict | None) -> dict:
    """One Trainer run: ``warmup`` steps unmeasured, then ``steps`` timed between two syncs."""
    from lorakit_ext.models.families import adapter_for
    from lorakit_ext.train.loop import Trainer, TrainJob

    total = args.warmup + args.steps
    config = bench_config(args, batch=batch, unet_only=unet_only, graphs=graphs)
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
    # A folder per row: LoRA Kit never replaces an epoch file another run wrote.
    job = TrainJob(config, project, project.path / "out" / run_name, project.runs / run_name, patch_attention=True,
                   channels_last={"auto": None, "on": True, "off": False}[layout])
    job.run_dir.mkdir(parents=True)
    trainer = Trainer(model, job, on_progress=on_progress)
    started = time.perf_counter()
    with SmiPeak(device) as smi:
        result = trainer.run()
    it_s = args.steps / (marks[f"step{total}"] - marks[f"step{args.warmup}"])
    row = {
        "mode": "graphs" if graphs and device.type == "cuda" and not marks.get("messages") else "eager",
        "notes": marks.get("messages", []),
        "train": "UNet only" if unet_only else "TE + UNet",
        "channels_last": layout,
        "batch": batch,
        "precision": trainer.precision.name,
        "it_per_s": it_s,
        "images_per_s": it_s * batch,
        "start_to_first_step_s": marks["first_step"] - started,
        "final_loss": result.losses[-1],
    }
    if device.type == "cuda":
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        if smi.peak_mib is not None:
            row["smi_peak_gib"] = smi.peak_mib / 1024
    if kohya:
        row["kohya_record"] = kohya
        row["kohya_same_run"] = True
        row["kohya_it_per_s"] = kohya["it_s"]
        row["ratio_vs_kohya"] = it_s / kohya["it_s"]
        if "smi_peak_mem_MiB" in kohya:
            row["kohya_smi_peak_gib"] = kohya["smi_peak_mem_MiB"] / 1024
        if "torch_max_memory_reserved_GiB" in kohya:
            row["kohya_peak_reserved_gib"] = kohya["torch_max_memory_reserved_GiB"]
    elif not args.tiny and (recorded := KOHYA_H200.get(("unet" if unet_only else "te", batch))):
        row["kohya_same_run"] = False
        row["kohya_it_per_s"] = recorded
        row["ratio_vs_kohya"] = it_s / recorded
    return row


def _gib(row: dict, key: str) -> str:
    return f"{row[key]:.2f}" if key in row else "-"


def _list(value: str, allowed=None) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if allowed is not None and v not in allowed]
    if not items or bad:
        raise UserError(f"expected a comma-separated list of {', '.join(allowed or ['values'])}, got {value!r}")
    return items


def run_bench(args) -> dict:
    from lorakit_ext.models.checkpoint import place_model
    from lorakit_ext.project import create_project

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    weights = _list(args.weights or ("fp16" if device.type == "cuda" else "fp32"), WEIGHTS)
    batches = [int(b) for b in _list(args.batch)]
    trains = _list(args.train, ("te", "unet"))
    modes = _list(args.modes, ("graphs", "eager"))
    layouts = _list(args.channels_last, ("auto", "on", "off"))
    if device.type != "cuda":
        modes = ["eager"]  # CUDA graphs exist only on CUDA: a "graphs" row would repeat the eager one
    kohya, notes = {}, []
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        tmp = Path(tmp)
        project = create_project(tmp, "bench")
        _dataset(project, args.images, args.resolution)
        if args.kohya_sd_scripts:
            # Before this process touches the GPU: kohya's nvidia-smi peak must be kohya's alone.
            configs = {(t, b): bench_config(args, batch=b, unet_only=t == "unet") for t in trains for b in batches}
            precision = resolve_precision(args.precision, device, WEIGHTS[weights[0]]).name
            kohya, notes = kohya_rows(args.kohya_sd_scripts, args.kohya_python, configs, project.dataset,
                                      precision=precision, warmup=args.warmup)
            if args.tiny:
                notes.append("--tiny: our rows ran the tiny model, kohya's the full-size SD1.5 it can load; the ratios compare different models")
        t0 = time.perf_counter()
        sd_model = _model(args.tiny, device, WEIGHTS[weights[0]], tmp)
        build_s = time.perf_counter() - t0
        for w in weights:
            place_model(sd_model, device, WEIGHTS[w])
            for train in trains:
                for batch in batches:
                    for mode, layout in itertools.product(modes, layouts):
                        row = _measure(sd_model, project, f"{w}-{train}-b{batch}-{mode}-{layout}", args, batch=batch,
                                       unet_only=train == "unet", device=device, graphs=mode == "graphs",
                                       layout=layout, kohya=kohya.get((train, batch)))
                        rows.append({"weights": w, **row})
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": "tiny SD1.5 layout" if args.tiny else "SD1.5 full size, random weights",
        "resolution": args.resolution,
        "images": args.images,
        "model_build_s": build_s,
        "rows": rows,
        "kohya_notes": notes,
    }


def run_cli(args):
    if args.steps < 1 or args.warmup < 1:
        raise UserError("--steps and --warmup must be at least 1")
    f = run_bench(args)
    lines = [f"{f['model']} on {f['device']}, {f['resolution']}², {f['images']} images, LoRA dim {args.dim}/alpha {args.alpha}"]
    lines.append(f"{'weights':7} {'mode':6} {'chlast':6} {'train':9} {'batch':>5} {'prec':4} {'it/s':>7} {'img/s':>7} {'first step':>10} "
                 f"{'reserved':>8} {'smi peak':>8} {'kohya it/s':>10} {'ratio':>6} {'kohya smi':>9}")
    for r in f["rows"]:
        kohya = f"{r['kohya_it_per_s']:.2f}" + ("" if r["kohya_same_run"] else "*") if "kohya_it_per_s" in r else "-"
        lines.append(
            f"{r['weights']:7} {r['mode']:6} {r['channels_last']:6} {r['train']:9} {r['batch']:>5} {r['precision']:4} {r['it_per_s']:7.2f} {r['images_per_s']:7.1f} "
            f"{r['start_to_first_step_s']:9.1f}s {_gib(r, 'peak_reserved_gib'):>8} {_gib(r, 'smi_peak_gib'):>8} {kohya:>10} "
            f"{(format(r['ratio_vs_kohya'], '.2f') + 'x') if 'ratio_vs_kohya' in r else '-':>6} {_gib(r, 'kohya_smi_peak_gib'):>9}"
        )
    for r in f["rows"]:
        lines += [f"note ({r['weights']} {r['mode']} {r['train']} b{r['batch']}): {n}" for n in r["notes"]]
    lines += [f"note: {n}" for n in f["kohya_notes"]]
    graphs = {(r["weights"], r["train"], r["batch"]): r["it_per_s"] for r in f["rows"] if r["mode"] == "graphs"}
    for r in f["rows"]:
        key = (r["weights"], r["train"], r["batch"])
        if r["mode"] == "eager" and key in graphs:
            lines.append(f"graphs vs eager, same run ({r['weights']} {r['train']} b{r['batch']}): {graphs[key] / r['it_per_s']:.2f}x")
    lines.append("first step: seconds from Trainer.run() to the first optimizer step, model already in memory (latent caching included).")
    lines.append("chlast: UNet weights and latents in channels_last (auto: on CUDA).")
    lines.append("reserved: torch's peak reserved memory, GiB; smi peak: nvidia-smi memory.used peak, GiB (CUDA context included).")
    if any(r.get("kohya_same_run") is False for r in f["rows"]):
        lines.append("kohya it/s*: kohya sd-scripts 48d368f as recorded on one H200, not this run (--kohya-sd-scripts runs it here).")
    return f, "\n".join(lines)


BENCH_CLI = {"train": (add_arguments, run_cli)}
