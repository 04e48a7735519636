"""GPU time of one training step, kernel by kernel and by kind (a CUDA diagnostic, not a test).

A captured step replays exactly the kernels of an eager step with the launch gaps removed, so the
eager step's summed kernel time is the floor a graph can reach. Profiles eager steps of the real
Trainer on a random full-size SD1.5.

    python dev/profile_step.py --batch 8 --train unet
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lorakit_ext.bench.train import WEIGHTS, _dataset
from lorakit_ext.models.families import adapter_for
from lorakit_ext.models.tiny import build_random_sd15
from lorakit_ext.project import create_project
from lorakit_ext.train.loop import Trainer, TrainJob
from lorakit_ext.train_config import TrainConfig

KINDS = [
    ("attention (SDPA/flash/cuDNN)", r"flash|fmha|attention|sdpa|cudnn.*(mha|sdp)"),
    ("convolution", r"conv|implicit_gemm|xmma_fprop|xmma_dgrad|xmma_wgrad|dgrad|wgrad|fprop|winograd|cutlass.*conv"),
    ("GEMM (linear, LoRA)", r"gemm|sm90_xmma|cutlass|cublas|nvjet|matmul"),
    ("norm (group/layer)", r"norm"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("elementwise/reduce/copy", r"elementwise|vectorized|reduce|copy|cat|fill|index|unrolled"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train", choices=("te", "unet"), default="unet")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    sd_model = build_random_sd15(torch.device("cuda"), WEIGHTS["bf16"], full=True)
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
        prof = profile(activities=[ProfilerActivity.CUDA])

        def on_progress(p) -> None:
            if p.phase != "training" or p.message:
                return
            if p.step == first:
                torch.cuda.synchronize()
                prof.__enter__()
            elif p.step == last:
                torch.cuda.synchronize()
                prof.__exit__(None, None, None)

        Trainer(model, job, on_progress=on_progress).run()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / args.steps / 1000
    print(f"batch {args.batch}, {args.train}: GPU kernel time {total:.1f} ms per step (floor for a captured step: {1000 / total:.2f} it/s)")
    kinds = collections.Counter()
    for e in events:
        name = e.key.lower()
        kind = next((k for k, pattern in KINDS if re.search(pattern, name)), "other")
        kinds[kind] += e.self_device_time_total / args.steps / 1000
    for kind, ms in kinds.most_common():
        print(f"  {ms:7.2f} ms  {100 * ms / total:5.1f} %  {kind}")
    print("top kernels:")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[: args.top]:
        print(f"  {e.self_device_time_total / args.steps / 1000:7.2f} ms  {e.count // args.steps:5d}x  {e.key[:110]}")


if __name__ == "__main__":
    main()
