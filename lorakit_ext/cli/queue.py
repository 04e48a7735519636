"""``queue add PROJECT [train options…]``, ``queue list``, ``queue cancel ID`` and ``queue run
--gpus 0,1``: several projects' trainings, run at once one per GPU (:mod:`lorakit_ext.run_queue`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from lorakit_ext.cli.output import Result
from lorakit_ext.errors import UserError


def register(sub, common) -> None:
    p = sub.add_parser("queue", help="queue trainings of several projects and run them at once, one per GPU")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=argparse.ArgumentParser)
    add = actions.add_parser("add", help="queue a training: PROJECT and the options `train` takes (--root and --json too)")
    add.add_argument("project")
    add.add_argument("train_options", nargs=argparse.REMAINDER, help="as for `train PROJECT …`")
    add.set_defaults(handler=_add, json=False, root=None)
    listed = actions.add_parser("list", parents=[common], help="the queue's entries and their status")
    listed.set_defaults(handler=_list)
    cancel = actions.add_parser("cancel", parents=[common], help="take a queued entry out of the queue")
    cancel.add_argument("entry")
    cancel.set_defaults(handler=_cancel)
    run = actions.add_parser("run", parents=[common], help="run the queued trainings until none is left")
    run.add_argument("--gpus", help="GPUs to use, e.g. 0,1 (default: every GPU torch sees, else the CPU)")
    run.add_argument("--runs-per-gpu", type=int, default=1, help="trainings at once on each GPU, when they fit (default 1)")
    run.add_argument("--cpu", type=int, metavar="N", help="run N trainings at once on the CPU instead of GPUs")
    run.set_defaults(handler=_run)


def _add(args) -> Result:
    from lorakit_ext.cli import build_parser
    from lorakit_ext.cli.train_options import config_from_args
    from lorakit_ext.project import open_project
    from lorakit_ext.run_queue import add_entry

    train = build_parser().parse_args(["train", args.project, *args.train_options])
    args.json = train.json
    if train.resume or train.gpus is not None:
        raise UserError("queue add takes a new run's options; --resume and --gpus belong to `train` itself")
    if not train.base_model:
        raise UserError("--base-model is required (the checkpoint the queued run trains on)")
    project = open_project(train.root, train.project)
    base_model = Path(train.base_model).expanduser().resolve()
    if not base_model.is_file():
        raise UserError(f"--base-model {train.base_model} does not exist")
    # Checked now, not when its turn comes: a queue left running overnight should not meet a typo.
    config_from_args(train)
    options = [o for o in args.train_options if o != "--json"]
    # Run where it was added: relative paths among the options (--base-model, --config, --out) mean the same then.
    entry = add_entry(project.root, project.name, ["train", project.name, *options, "--root", str(project.root)], cwd=os.getcwd())
    return Result({"entry": entry}, f"queued {entry['id']}; run the queue with: python -m lorakit_ext queue run --root {project.root}")


def _describe(entry: dict) -> str:
    where = f" on {entry['slot']}" if entry.get("slot") else ""
    took = f" in {entry['wall_s']:.0f} s" if entry.get("wall_s") is not None else ""
    return f"{entry['id']}  {entry['status']}{where}{took}"


def _list(args) -> Result:
    from lorakit_ext.run_queue import list_entries

    entries = list_entries(Path(args.root))
    return Result({"entries": entries}, "\n".join(_describe(e) for e in entries) or "the queue is empty")


def _cancel(args) -> Result:
    from lorakit_ext.run_queue import cancel_entry

    entry = cancel_entry(Path(args.root), args.entry)
    return Result({"entry": entry}, f"cancelled {entry['id']}")


def _slots(args) -> list:
    from lorakit_ext.run_queue import Slot

    if args.runs_per_gpu < 1:
        raise UserError("--runs-per-gpu must be at least 1")
    if args.cpu is not None:
        if args.gpus or args.cpu < 1:
            raise UserError("--cpu N takes N ≥ 1 and no --gpus")
        return [Slot.cpu(max(1, (os.cpu_count() or 1) // args.cpu)) for _ in range(args.cpu)]
    if args.gpus:
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
        if not all(g.isdigit() for g in gpus):
            raise UserError(f"--gpus {args.gpus!r}: give GPU numbers, e.g. 0,1")
    else:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
        if not gpus:
            return [Slot.cpu()]
    # Round-robin, so a second run goes to another GPU before a GPU gets two.
    return [Slot.gpu(g) for _ in range(args.runs_per_gpu) for g in gpus]


def _run(args) -> Result:
    from lorakit_ext.cli.progress import first_ctrl_c_stops
    from lorakit_ext.run_queue import run_queue

    slots = _slots(args)
    started = time.perf_counter()

    def report(entry: dict) -> None:
        print(_describe(entry), file=sys.stderr, flush=True)

    with first_ctrl_c_stops("stopping: the running trainings save and stop, nothing more starts…") as should_stop:
        done = run_queue(Path(args.root), slots, should_stop=should_stop, on_change=report)
    wall = time.perf_counter() - started
    failed = [e for e in done if e["status"] != "finished"]
    text = "\n".join([_describe(e) for e in done] + [f"{len(done)} run(s) in {wall:.0f} s on {len(slots)} slot(s)"])
    return Result({"entries": done, "wall_s": wall, "slots": [s.name for s in slots]}, text, ok=not failed)
