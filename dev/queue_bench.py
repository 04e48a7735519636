"""Two SD1.5 trainings on one GPU at once through the run queue, against one alone: wall time and
steps per second of both together (issue: a queue of runs across GPUs).

Each run is the seed's settings on a smaller dataset (a random-initialised SD1.5 checkpoint file,
``--images`` images in 3 aspect-ratio buckets, ``--epochs`` epochs, batch 2, TE + UNet), started
as a user starts it: ``queue add`` then ``queue run --gpus 0 [--runs-per-gpu 2]``.

    python dev/queue_bench.py --out /tmp/queue [--images 42 --epochs 3]

``--tiny`` is a CPU check of the script itself (tiny model at 64²).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_run import make_dataset, write_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def cli(args: list[str], env: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", "lorakit_ext", *args, "--json"], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def queue_round(root: Path, names: list[str], checkpoint: Path, options: list[str], per_gpu: int, env: dict) -> dict:
    for name in names:
        cli(["queue", "add", name, "--root", str(root), "--base-model", str(checkpoint), *options], env)
    started = time.perf_counter()
    ran = cli(["queue", "run", "--root", str(root), "--gpus", "0", "--runs-per-gpu", str(per_gpu)], env)
    wall = time.perf_counter() - started
    steps = sum(entry["result"]["steps"] for entry in ran["entries"])
    return {"runs": len(names), "wall_s": wall, "steps": steps, "steps_per_s": steps / wall,
            "each_wall_s": [entry["wall_s"] for entry in ran["entries"]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=42)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    root = work / "projects"
    checkpoint = write_checkpoint(work / "sd15-random.safetensors", tiny=args.tiny)
    side = 64 if args.tiny else 512
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for name in ("alone", "first", "second"):
        cli(["project", "create", name, "--root", str(root)], env)
        make_dataset(root / name / "dataset", args.images, side)
    options = ["--repeats", "10", "--epochs", str(args.epochs), "--batch-size", "2"]
    if args.tiny:
        options += ["--set", "resolution=64", "--set", "min_bucket_reso=64"]
    report = {"alone": queue_round(root, ["alone"], checkpoint, options, 1, env),
              "together": queue_round(root, ["first", "second"], checkpoint, options, 2, env)}
    report["combined_vs_alone"] = report["together"]["steps_per_s"] / report["alone"]["steps_per_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "queue_bench.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
