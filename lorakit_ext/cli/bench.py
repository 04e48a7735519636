"""``bench KIND …``: one sub-command per entry of a ``BENCH_CLI`` dict in a ``lorakit_ext.bench`` module.

A new kind of benchmark is a new module in that package; this file does not change.
``run_cli(args)`` returns ``(data, text)``: the figures for ``--json`` and their report for people.
"""

from __future__ import annotations

import importlib
import pkgutil

import lorakit_ext.bench
from lorakit_ext.cli.output import Result


def _kinds() -> dict:
    kinds = {}
    for info in sorted(pkgutil.iter_modules(lorakit_ext.bench.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"lorakit_ext.bench.{info.name}")
        kinds.update(getattr(module, "BENCH_CLI", {}))
    return kinds


def register(sub, common) -> None:
    p = sub.add_parser("bench", help="measure how fast LoRA Kit runs here")
    # The benchmark modules import torch: they load only when `bench` itself is parsed.
    p.fill_when_used(lambda parser: _add_kinds(parser, common))
    p.set_defaults(handler=run)


def _add_kinds(parser, common) -> None:
    # --root/--json belong to each KIND's parser: nested parsers would re-default them.
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    for name, (add_arguments, run_cli) in _kinds().items():
        k = kinds.add_parser(name, parents=[common], help=f"{name} benchmark")
        add_arguments(k)
        k.set_defaults(bench_run=run_cli)


def run(args) -> Result:
    data, text = args.bench_run(args)
    return Result(data, text)
