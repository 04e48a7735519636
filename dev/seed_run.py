"""The seed-sized run, as a user starts it, timed from the outside: a random-initialised SD1.5
checkpoint file, 126 images in 3 aspect-ratio buckets × 10 repeats × 10 epochs, batch 2, TE + UNet,
project defaults, ``python -m lorakit_ext train``; then ``compare`` on its epochs.

Prints (and writes to ``--out``/seed_run.json) the wall time to the plan, to the first training
report and to the end, the run's steps and it/s, nvidia-smi's peak, and the epoch report. Run on a
CUDA machine; ``--tiny`` is a CPU check of the script itself (tiny model, 8 images, 1 epoch).

With ``--max-steps N --cold WHAT`` the start-up is measured cold as well, after the first run (as
the machine comes): ``libraries``: two more runs after dropping the CUDA libraries' pages from the
page cache (posix_fadvise, no root needed), one with the run's own background read of them
switched off, one with it on; ``jit-cache``: one more after removing the CUDA driver's cache of
kernels it compiled at run time (``~/.nv/ComputeCache``), which a freshly started machine lacks.

With ``--kohya-sd-scripts`` kohya's ``train_network.py`` then trains on the same 3-bucket dataset
from the run's own kohya TOML pair, cut to ``--kohya-steps`` steps (enough to meet every bucket),
for its start-up, rate and nvidia-smi peak beside ours.

    python dev/seed_run.py --out /tmp/seed [--kohya-sd-scripts DIR --kohya-python PY]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tomllib

import numpy as np
import torch
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

    from lorakit_ext.models.tiny import build_random_sd15, build_tiny_sd15, fp16_checkpoint

    if tiny:
        return build_tiny_sd15(path.parent)
    model = build_random_sd15("cpu", torch.float32, full=True)
    safetensors.torch.save_file(fp16_checkpoint(model), str(path), metadata={"format": "pt"})
    return path


MODULE = ("-m", "lorakit_ext")
# The CLI with its background read of the CUDA libraries switched off (lorakit_ext.cli.library_warmup).
NO_WARMUP = ("-c", "import runpy, sys; from lorakit_ext.cli import library_warmup as w; w.read_gpu_libraries_in_background = lambda: None; "
             "sys.argv[0] = 'lorakit_ext'; runpy.run_module('lorakit_ext', run_name='__main__', alter_sys=True)")


def resident_share(files: list[Path]) -> float:
    """The share of the files' pages in the page cache (mincore on a read-only mapping of each)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    resident = total = 0
    for path in files:
        size = path.stat().st_size
        pages = -(-size // mmap.PAGESIZE)
        with open(path, "rb") as fh:
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fh.fileno(), 0) if size else None
            if not address or address == ctypes.c_void_p(-1).value:
                continue
            vector = (ctypes.c_ubyte * pages)()
            if libc.mincore(address, size, vector) == 0:
                resident += sum(v & 1 for v in vector)
                total += pages
            libc.munmap(address, size)
    return resident / total if total else 0.0


def evict(files: list[Path]) -> None:
    """Drops the files' clean pages from the page cache, as a freshly started machine has none."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_cli(args: list[str], env: dict, log: Path, profile: Path | None = None, launcher: tuple[str, ...] = MODULE) -> dict:
    """Runs the CLI, noting when the plan and the first training line appear (seconds from start)
    and nvidia-smi's peak and its changes while it runs; its output goes to ``log`` line by line, so
    a run cut short still leaves what it said. ``profile``: under cProfile, its statistics there;
    without, ``-X importtime`` lines go to the log when ``env`` sets PYTHONPROFILEIMPORTTIME."""
    from lorakit_ext.bench.smi import SmiPeak

    started = time.perf_counter()
    marks = {}
    with SmiPeak(torch.device("cuda" if torch.cuda.is_available() else "cpu")) as smi, subprocess.Popen(
            [sys.executable, *(["-m", "cProfile", "-o", str(profile)] if profile else []), *launcher, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True) as proc, open(log, "w", encoding="utf-8") as out:
        for line in proc.stdout:
            now = time.perf_counter() - started
            out.write(f"{now:8.2f}  {line.rstrip()}\n")
            out.flush()
            if "Found " in line and "plan_s" not in marks:
                marks["plan_s"] = now
            if line.startswith("epoch ") and "step " in line and "first_step_s" not in marks:
                marks["first_step_s"] = now
    marks["wall_s"] = time.perf_counter() - started
    marks["exit"] = proc.returncode
    marks["smi_peak_MiB"] = smi.peak_mib
    marks["smi_MiB_at_s"] = smi.timeline
    return marks


def kohya_on_run(run: Path, sd_scripts: str, python: str, steps: int, work: Path) -> dict:
    """kohya's train_network.py from the run's kohya TOML pair, cut to ``steps`` steps, writing into
    ``work`` rather than the run's output folder."""
    from lorakit_ext.bench.kohya import CLOCK, OFFLINE, _check_inputs, write_tokenizers
    from lorakit_ext.bench.models import FAMILIES
    from lorakit_ext.bench.smi import SmiPeak
    from lorakit_ext.export.kohya_toml import render_train_table

    folder, exe = _check_inputs(sd_scripts, python, "train_network.py")
    args = tomllib.loads((run / "kohya_config.toml").read_text(encoding="utf-8"))["train"]
    args.pop("max_train_epochs", None)
    work.mkdir(parents=True, exist_ok=True)
    args.update(max_train_steps=steps, output_dir=str(work / "out"), save_every_n_epochs=None,
                tokenizer_cache_dir=str(write_tokenizers(work / "tokenizers", FAMILIES["sd1"])))
    (work / "config.toml").write_text(render_train_table(args), encoding="utf-8")
    clock = work / "clock.json"
    started = time.perf_counter()
    with open(work / "kohya.log", "w", encoding="utf-8") as log, SmiPeak(torch.device("cuda")) as smi:
        done = subprocess.run([exe, str(CLOCK), str(folder / "train_network.py"), str(clock), "--config_file", str(work / "config.toml")],
                              cwd=folder, env={**os.environ, **OFFLINE, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT)
    ends = json.loads(clock.read_text(encoding="utf-8"))["step_end_s"] if clock.exists() else []
    record = {"exit": done.returncode, "steps": len(ends), "wall_s": time.perf_counter() - started, "smi_peak_MiB": smi.peak_mib,
              "smi_MiB_at_s": smi.timeline}
    if len(ends) > 20:
        record.update(first_step_s=ends[0], it_s=(len(ends) - 20) / (ends[-1] - ends[19]))
    return record


def jit_cache() -> Path:
    return Path(os.environ.get("CUDA_CACHE_PATH", "~/.nv/ComputeCache")).expanduser()


def _tree_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20 if folder.is_dir() else 0.0


def _evict_libraries() -> dict:
    from lorakit_ext.cli.library_warmup import gpu_library_files

    libraries = gpu_library_files()
    evict(libraries)
    return {"libraries_resident_before": resident_share(libraries)}


def _clear_jit_cache() -> dict:
    cleared = {"jit_cache_MiB_before": _tree_mib(jit_cache())}
    shutil.rmtree(jit_cache(), ignore_errors=True)
    return cleared


# --cold's runs after the first: (name, what to do before it, how the CLI is started).
COLD_RUNS = {
    "libraries": [("evicted", _evict_libraries, NO_WARMUP), ("evicted_warmed", _evict_libraries, MODULE)],
    "jit-cache": [("jit_cache_cleared", _clear_jit_cache, MODULE)],
}


def cold_start(args, command: list[str], env: dict, report: dict, save) -> None:
    """The first run (it meets a machine whose libraries may not be in the page cache yet, nor its
    JIT cache filled), then ``--cold``'s runs."""
    from lorakit_ext.cli.library_warmup import gpu_library_files

    libraries = gpu_library_files()
    report["before_first"] = {"libraries": len(libraries), "libraries_GiB": sum(p.stat().st_size for p in libraries) / 2**30,
                              "libraries_resident": resident_share(libraries), "jit_cache_MiB": _tree_mib(jit_cache())}
    report["first"] = timed_cli(command, env, args.out / "first.log", profile=args.out / "train.prof" if args.profile else None)
    save()
    for name, prepare, launcher in COLD_RUNS.get(args.cold, []):
        prepared = prepare()
        report[name] = {**prepared, **timed_cli(command, env, args.out / f"{name}.log", launcher=launcher)}
        save()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--kohya-sd-scripts")
    parser.add_argument("--kohya-python", default=sys.executable)
    parser.add_argument("--kohya-steps", type=int, default=200)
    parser.add_argument("--max-steps", type=int, default=0,
                        help="start-up only: train this many steps, twice (the second with -X importtime into train.log), "
                             "no compare")
    parser.add_argument("--profile", action="store_true", help="with --max-steps: the first run under cProfile, to --out/train.prof")
    parser.add_argument("--cold", choices=sorted(COLD_RUNS), help="with --max-steps: more runs after the first, each from a "
                        "start made cold in one way (see the module's help)")
    parser.add_argument("--no-compare", action="store_true", help="skip compare after the run (its grid takes minutes of a call)")
    parser.add_argument("--compile-blocks", action="store_true",
                        help="train with the UNet's blocks compiled (each bucket shape's compile time is in the record's graph_pools)")
    args = parser.parse_args()
    work = args.out / "work"
    root = work / "projects"
    images, side = (8, 64) if args.tiny else (126, 512)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = write_checkpoint(work / "sd15-random.safetensors", args.tiny)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "lorakit_ext", "project", "create", "kat3r1na", "--root", str(root)], cwd=REPO, env=env, check=True)
    make_dataset(root / "kat3r1na" / "dataset", images, side)
    options = ["--repeats", "10", "--epochs", "10", "--batch-size", "2"] if not args.tiny else [
        "--repeats", "1", "--epochs", "2", "--batch-size", "2", "--set", "resolution=64", "--set", "min_bucket_reso=64"]
    if args.max_steps:
        options += ["--set", f"max_train_steps={args.max_steps}"]
    if args.compile_blocks:
        options.append("--compile-blocks")
    command = ["train", "kat3r1na", "--root", str(root), "--base-model", str(checkpoint), *options]
    report = {}

    def save() -> None:  # after each part, so a run cut short by a time limit still tells what it did
        (args.out / "seed_run.json").write_text(json.dumps(report, indent=1), encoding="utf-8")

    if args.max_steps:
        cold_start(args, command, env, report, save)
    timed = {**env, "PYTHONPROFILEIMPORTTIME": "1"} if args.max_steps else env
    train = report["train"] = timed_cli(command, timed, args.out / "train.log")
    save()
    if train["exit"] == 0:
        runs = sorted((root / "kat3r1na" / "runs").iterdir())
        record = json.loads((runs[-1] / "run.json").read_text(encoding="utf-8"))
        report["steps"] = record.get("steps_done")
        save()
        if args.max_steps:
            if args.kohya_sd_scripts:
                report["kohya"] = kohya_on_run(runs[-1], args.kohya_sd_scripts, args.kohya_python, args.kohya_steps, work / "kohya")
                save()
            print(json.dumps(report, indent=1))
            return train["exit"]
        if not args.no_compare:
            compare = timed_cli(["compare", "kat3r1na", "--root", str(root), "--json", "--steps", "20" if not args.tiny else "3",
                                 "--size", str(side)], env, args.out / "compare.log")
            report["compare"] = compare
            report["epochs"] = json.loads((runs[-1] / "epochs.json").read_text(encoding="utf-8"))
            save()
        if args.kohya_sd_scripts:
            report["kohya"] = kohya_on_run(runs[-1], args.kohya_sd_scripts, args.kohya_python, args.kohya_steps, work / "kohya")
            save()
    print(json.dumps({k: v for k, v in report.items() if k != "epochs"}, indent=1))
    for row in report.get("epochs", {}).get("epochs", []):
        print(row["label"], row["validation_loss"], row.get("effect"), row.get("likeness"), row.get("flags"))
    if "epochs" in report:
        print(report["epochs"]["suggestion"]["reason"])
    return train["exit"]


if __name__ == "__main__":
    raise SystemExit(main())
