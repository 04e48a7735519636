"""GPU proof run for the training core (run on a CUDA machine; not part of the CPU test suite).

1. A 2-epoch training of a random-initialised full-size SD1.5 in fp16 weights through the Trainer
   (the CLI's and the tab's code path): no NaN, epoch files written, base weights bit-identical.
2. The same through the CLI: a checkpoint file saved, `python -m lorakit_ext train` on it.
Prints one PASS/FAIL line per check; exit 1 on any FAIL.
"""

from __future__ import annotations

import hashlib
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from PIL import Image

from lorakit_ext.cli import main as cli_main
from lorakit_ext.models.families import adapter_for
from lorakit_ext.models.tiny import build_random_sd15
from lorakit_ext.project import create_project
from lorakit_ext.train.loop import Trainer, TrainJob
from lorakit_ext.train_config import TrainConfig

failures = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        failures.append(name)


def fingerprint(model) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()] + [(n, m.training) for n, m in model.named_modules()]
    h.update(repr(flags).encode())
    return h.hexdigest()


def dataset(project, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        size = (512, 512) if i % 3 else (512, 768)
        Image.fromarray(rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)).resize(size).save(project.dataset / f"{i:03d}.png")
        (project.dataset / f"{i:03d}.txt").write_text(f"kat3r1na, tag{i % 5}, red hair")


def main() -> int:
    device = torch.device("cuda")
    tmp = Path(tempfile.mkdtemp(prefix="lorakit-gpu-"))
    project = create_project(tmp, "gpu")
    dataset(project, 24)
    sd_model = build_random_sd15(device, torch.float16, full=True)
    before = fingerprint(sd_model)
    config = TrainConfig(num_repeats=1, max_train_epochs=2, train_batch_size=2, optimizer="AdamW").validate()
    job = TrainJob(config, project, tmp / "out", project.runs / "trainer", base_model_name="random-sd15", patch_attention=True)
    job.run_dir.mkdir(parents=True)
    model = adapter_for(sd_model, clip_skip=config.clip_skip, max_token_length=config.max_token_length)
    t0 = time.perf_counter()
    trainer = Trainer(model, job)
    result = trainer.run()
    check("trainer: 2 epochs, fp16 weights", result.steps > 0, f"{result.steps} steps in {time.perf_counter() - t0:.1f}s, precision {trainer.precision.name}")
    check("trainer: no NaN", all(math.isfinite(x) for x in result.losses), f"loss {result.losses[0]:.4f} → {result.losses[-1]:.4f}")
    check("trainer: epoch files", [p.name for p in result.files] == ["gpu-01.safetensors", "gpu-02.safetensors"], str([p.name for p in result.files]))
    check("trainer: base weights unchanged", fingerprint(sd_model) == before)
    torch.cuda.synchronize()
    check("trainer: VRAM released", torch.cuda.memory_allocated(device) < 2.5 * 2**30, f"{torch.cuda.memory_allocated(device) / 2**30:.2f} GiB allocated after the run (model ~1.6 GiB)")

    ckpt = tmp / "random-sd15.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd_model.state_dict().items()}, str(ckpt))
    del sd_model, model, trainer
    torch.cuda.empty_cache()
    rc = cli_main(["train", "gpu", "--root", str(tmp), "--base-model", str(ckpt), "--out", str(tmp / "cli-out"),
                   "--repeats", "1", "--epochs", "2", "--set", "optimizer=AdamW", "--set", "mixed_precision=bf16", "--weights", "bf16"])
    files = sorted(p.name for p in (tmp / "cli-out").glob("*.safetensors"))
    check("cli: train on a saved checkpoint, bf16", rc == 0 and files == ["gpu-01.safetensors", "gpu-02.safetensors"], str(files))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
