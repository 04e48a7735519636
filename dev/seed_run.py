"""The seed-sized run, as a user starts it, timed from the outside: a random-initialised SD1.5
checkpoint file, 126 images in 3 aspect-ratio buckets × 10 repeats × 10 epochs, batch 2, TE + UNet,
project defaults, ``python -m lorakit_ext train``; then ``compare`` on its epochs.

Prints (and writes to ``--out``/seed_run.json) the wall time to the plan, to the first training
report and to the end, the run's steps and it/s, nvidia-smi's peak, and the epoch report. Run on a
CUDA machine; ``--tiny`` is a CPU check of the script itself (tiny model, 8 images, 1 epoch).

    python dev/seed_run.py --out /tmp/seed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Three buckets, as the seed's photos fall into: portrait, square, landscape.
SHAPES = [(512, 768), (512, 512), (768, 512)]


def make_dataset(folder: Path, images: int, side: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        w, h = SHAPES[i % 3]
        w, h = w * side // 512, h * side // 512
        noise = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        Image.fromarray(noise).resize((w, h)).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(f"kat3r1na, 1girl, tag{i % 7}, tag{i % 5}", encoding="utf-8")


def write_checkpoint(path: Path, tiny: bool) -> Path:
    import safetensors.torch
    import torch

    from lorakit_ext.models.tiny import build_random_sd15, build_tiny_sd15, fp16_checkpoint

    if tiny:
        return build_tiny_sd15(path.parent)
    model = build_random_sd15("cpu", torch.float32, full=True)
    safetensors.torch.save_file(fp16_checkpoint(model), str(path), metadata={"format": "pt"})
    return path


def timed_cli(args: list[str], env: dict) -> tuple[dict, list[str]]:
    """Runs the CLI, noting when the plan and the first training line appear (seconds from start)."""
    started = time.perf_counter()
    marks, lines = {}, []
    with subprocess.Popen([sys.executable, "-m", "lorakit_ext", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            now = time.perf_counter() - started
            lines.append(f"{now:8.2f}  {line.rstrip()}")
            if "Found " in line and "plan_s" not in marks:
                marks["plan_s"] = now
            if line.startswith("epoch ") and "step " in line and "first_step_s" not in marks:
                marks["first_step_s"] = now
    marks["wall_s"] = time.perf_counter() - started
    marks["exit"] = proc.returncode
    return marks, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    work = args.out / "work"
    root = work / "projects"
    images, side = (8, 64) if args.tiny else (126, 512)
    checkpoint = write_checkpoint(work / "sd15-random.safetensors", args.tiny)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "lorakit_ext", "project", "create", "kat3r1na", "--root", str(root)], cwd=REPO, env=env, check=True)
    make_dataset(root / "kat3r1na" / "dataset", images, side)
    options = ["--repeats", "10", "--epochs", "10", "--batch-size", "2"] if not args.tiny else [
        "--repeats", "1", "--epochs", "2", "--batch-size", "2", "--set", "resolution=64", "--set", "min_bucket_reso=64"]
    train, lines = timed_cli(["train", "kat3r1na", "--root", str(root), "--base-model", str(checkpoint), *options], env)
    (args.out / "train.log").write_text("\n".join(lines), encoding="utf-8")
    report = {"train": train}
    if train["exit"] == 0:
        compare, lines = timed_cli(["compare", "kat3r1na", "--root", str(root), "--json", "--steps", "20" if not args.tiny else "3",
                                    "--size", str(side)], env)
        (args.out / "compare.log").write_text("\n".join(lines), encoding="utf-8")
        report["compare"] = compare
        runs = sorted((root / "kat3r1na" / "runs").iterdir())
        record = json.loads((runs[-1] / "run.json").read_text(encoding="utf-8"))
        report["steps"] = record.get("steps_done")
        report["epochs"] = json.loads((runs[-1] / "epochs.json").read_text(encoding="utf-8"))
    (args.out / "seed_run.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "epochs"}, indent=1))
    for row in report.get("epochs", {}).get("epochs", []):
        print(row["label"], row["validation_loss"], row.get("effect"), row.get("likeness"), row.get("flags"))
    if "epochs" in report:
        print(report["epochs"]["suggestion"]["reason"])
    return train["exit"]


if __name__ == "__main__":
    raise SystemExit(main())
