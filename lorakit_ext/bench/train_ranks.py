"""``bench train --gpus 1,2``: the same rows trained data-parallel in 1, then 2, … processes (one
GPU each), each world size started as ``train --gpus N`` starts one; the report puts the rows side
by side with each row's images/s against the same row in the fewest processes."""

from __future__ import annotations

import json
import tempfile

from lorakit_ext.bench.train_report import row_settings
from lorakit_ext.cli.ranks import run_ranks
from lorakit_ext.errors import UserError


def _sizes(value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UserError(f"--gpus {value!r}: give numbers of GPUs, e.g. 1,2")
    return sizes


def _without_gpus(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus=") and arg != "--json":
            out.append(arg)
    return out


def run_world_sizes(args) -> dict:
    """Runs the benchmark once per world size of ``--gpus``; the figures of every size's rank 0."""
    import torch

    sizes = _sizes(args.gpus)
    if args.device != "cpu" and max(sizes) > torch.cuda.device_count():
        raise UserError(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} GPU(s) torch can see")
    # The ranks see --gpus too and, started with WORLD_SIZE set, train instead of launching.
    argv = [*_without_gpus(args.argv), "--gpus", args.gpus, "--json"]
    merged = None
    for size in sizes:
        with tempfile.TemporaryFile("w+", encoding="utf-8") as out:
            code = run_ranks(argv, size, stdout=out)
            out.seek(0)
            printed = out.read()
        if code != 0:
            raise UserError(f"the benchmark in {size} process(es) failed (exit code {code}); its error is above")
        figures = json.loads(printed)
        figures.pop("ok", None)
        if merged is None:
            merged = figures
        else:
            merged["rows"] += figures["rows"]
            merged["kohya_notes"] += [n for n in figures["kohya_notes"] if n not in merged["kohya_notes"]]
    _scaling(merged["rows"])
    merged["processes"] = sizes
    return merged


def _scaling(rows: list[dict]) -> None:
    """Each row's images/s over the same row's in the fewest processes (``scaling``)."""
    def key(row):
        return row["mode"], row_settings(row)

    base = {}
    for row in sorted(rows, key=lambda r: r["processes"]):
        if "images_per_s" in row:
            first = base.setdefault(key(row), row)
            row["scaling"] = row["images_per_s"] / first["images_per_s"]
