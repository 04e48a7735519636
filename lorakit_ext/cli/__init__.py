"""``python -m lorakit_ext COMMAND …``: every command is a module in this package with a
``register(subparsers, common)`` function; the module's handler returns a :class:`Result`."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import tempfile
import time
import traceback

from lorakit_ext.cli.output import Result
from lorakit_ext.failures import as_user_error

# The order commands are listed in --help: the order of the workflow. Unlisted modules follow.
ORDER = ("project", "import_images", "dedupe", "undo", "caption", "captions", "tags", "reg_images", "plan", "train", "queue", "compare", "demo", "bench")


def _command_modules():
    found = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    ordered = [name for name in ORDER if name in found] + sorted(found - set(ORDER))
    modules = [importlib.import_module(f"{__name__}.{name}") for name in ordered]
    # Helper modules (output, shared option groups) live here too; commands have register().
    return [m for m in modules if hasattr(m, "register")]


class AnyOrderParser(argparse.ArgumentParser):
    """A command's parser that takes options anywhere among its positionals:
    ``captions P set --json NAME TEXT``.

    Plain argparse fills every positional from the first run of words it meets, so in that line
    PROJECT and ACTION take ``P set`` and VALUES takes nothing; ``NAME TEXT`` after the option are
    then refused as unrecognised. Intermixed parsing reads the options first, then all the words.

    It can also be filled in only when its command is parsed (:meth:`fill_when_used`).
    """

    _nested = False
    _fill = None

    def fill_when_used(self, fill) -> None:
        """Leaves adding this parser's arguments to ``fill(parser)``, called when the command is
        parsed (its ``--help`` included): a command whose options live in modules that import torch
        keeps them out of ``--help`` and of every other command."""
        self._fill = fill

    def parse_known_args(self, args=None, namespace=None):
        if self._fill is not None:
            fill, self._fill = self._fill, None
            fill(self)
        # parse_known_intermixed_args calls parse_known_args itself (before Python 3.13), and refuses
        # parsers with sub-commands (bench): those parse as usual.
        if self._nested or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._nested = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._nested = False


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--root",
        default=os.environ.get("LORAKIT_ROOT", "lorakit"),
        help="projects root folder (default: $LORAKIT_ROOT or ./lorakit)",
    )
    common.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser = argparse.ArgumentParser(
        prog="python -m lorakit_ext",
        description="LoRA Kit: import → dedupe → caption → curate tags → plan → train, headless.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=AnyOrderParser)
    for module in _command_modules():
        module.register(sub, common)
    return parser


def _fail(args, message: str, code: int) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": message}, ensure_ascii=False))
    else:
        print(f"error: {message}", file=sys.stderr)
    return code


def _bug_report(exc: BaseException) -> str:
    """Saves the traceback of an unexpected error and says where; the user sees one line."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(tempfile.gettempdir(), f"lorakit-error-{stamp}-{os.getpid()}.log")
    try:
        with open(path, "w", encoding="utf-8") as fh:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=fh)
    except OSError:
        return f"unexpected {type(exc).__name__}: {exc} (this is a LoRA Kit bug; please report it)"
    return f"unexpected {type(exc).__name__}: {exc} (a LoRA Kit bug: please report it with the traceback in {path})"


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.started = started  # train's run record counts its start-up phases from here
    # What a command that starts itself again in other processes (train --gpus) passes on.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        result: Result = args.handler(args)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - every failure ends as one line, never a traceback
        if os.environ.get("LORAKIT_DEBUG"):
            raise
        known = as_user_error(exc)
        return _fail(args, str(known) if known else _bug_report(exc), 2)
    if result.printed:
        return result.code
    if args.json:
        print(json.dumps({"ok": result.ok, **result.data}, ensure_ascii=False, indent=2, default=str))
    elif result.text:
        print(result.text)
    return result.code
