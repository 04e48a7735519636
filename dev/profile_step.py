"""GPU time of one training step, kernel by kernel and by kind (a CUDA diagnostic, not a test).

A captured step replays exactly the kernels of an eager step with the launch gaps removed, so the
eager step's summed kernel time is the floor a graph can reach. Profiles eager steps of the real
Trainer on a random full-size SD1.5 (:mod:`lorakit_ext.bench.kernel_profile` sorts the kernels).

    python dev/profile_step.py --batch 8 --train unet
    python dev/profile_step.py --batch 8 --train unet --sources   # + which lines the copies come from

``--tiny --device cpu`` checks the tool itself on the tiny model.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from lorakit_ext.bench.kernel_profile import StepProfiler
from lorakit_ext.bench.train import WEIGHTS, _dataset
from lorakit_ext.models.families import adapter_for
from lorakit_ext.models.tiny import build_random_sd15
from lorakit_ext.project import create_project
from lorakit_ext.train.loop import Trainer, TrainJob
from lorakit_ext.train_config import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train", choices=("te", "unet"), default="unet")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--sources", action="store_true", help="also the operators and Python lines behind the elementwise/copy/cast time")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    sd_model = build_random_sd15(device, WEIGHTS["bf16" if device.type == "cuda" else "fp32"], full=not args.tiny)
    first, last = 4, 4 + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        project = create_project(Path(tmp), "profile")
        _dataset(project, 32, 512)
        config = TrainConfig(
            train_batch_size=args.batch, max_train_steps=last + 1, max_train_epochs=1, num_repeats=args.batch,
            text_encoder_lr=1e-4 if args.train == "te" else 0.0, optimizer="AdamW", keep_only_last_n_epochs=0,
            save_every_n_epochs=1000, cuda_graphs=False,
        ).validate()
        model = adapter_for(sd_model, clip_skip=config.clip_skip, max_token_length=config.max_token_length)
        job = TrainJob(config, project, project.path / "out", project.runs / "p", patch_attention=True)
        job.run_dir.mkdir(parents=True)
        profiler = StepProfiler(device, first, last, sources=args.sources)
        Trainer(model, job, on_progress=profiler).run()
    result = profiler.result
    print(f"batch {args.batch}, {args.train}: GPU kernel time {result['step_ms']:.1f} ms per step "
          f"(floor for a captured step: {result['floor_it_s']:.2f} it/s)")
    for kind, ms in result["kinds_ms"].items():
        print(f"  {ms:7.2f} ms  {100 * ms / result['step_ms']:5.1f} %  {kind}")
    print("top kernels:")
    for kernel in result["top"][: args.top]:
        print(f"  {kernel['ms']:7.2f} ms  {kernel['calls']:5d}x  {kernel['name'][:110]}")
    if args.sources:
        print("elementwise/copy/cast by operator and caller:")
        for row in result["elementwise_sources"][: args.top]:
            print(f"  {row['ms']:7.2f} ms  {row['calls']:5d}x  {row['op']:<22} " + " <- ".join(row["callers"]))


if __name__ == "__main__":
    main()
