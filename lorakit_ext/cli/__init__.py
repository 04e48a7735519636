"""``python -m lorakit_ext COMMAND …``: every command is a module in this package with a
``register(subparsers, common)`` function; the module's handler returns a :class:`Result`."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys

from lorakit_ext.cli.output import Result
from lorakit_ext.errors import UserError

# The order commands are listed in --help: the order of the workflow. Unlisted modules follow.
ORDER = ("project", "import_images", "dedupe", "undo", "caption", "captions", "tags", "plan", "train", "demo", "bench")


def _command_modules():
    found = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    ordered = [name for name in ORDER if name in found] + sorted(found - set(ORDER))
    modules = [importlib.import_module(f"{__name__}.{name}") for name in ordered]
    # Helper modules (output, shared option groups) live here too; commands have register().
    return [m for m in modules if hasattr(m, "register")]


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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _command_modules():
        module.register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: Result = args.handler(args)
    except UserError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": str(exc)}, ensure_ascii=False))
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({"ok": result.ok, **result.data}, ensure_ascii=False, indent=2, default=str))
    elif result.text:
        print(result.text)
    return 0 if result.ok else 1
