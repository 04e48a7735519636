"""``demo``: the whole pipeline on built-in synthetic data, offline."""

from __future__ import annotations

from pathlib import Path

from lorakit_ext.cli.output import Result


def register(sub, common) -> None:
    p = sub.add_parser("demo", parents=[common], help="run the whole pipeline on built-in demo data")
    p.add_argument("--no-train", action="store_true", help="stop after the plan (dataset half only)")
    p.set_defaults(handler=run)


def run(args) -> Result:
    from lorakit_ext.demo.run import run_demo

    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        if not args.json:
            print(line, flush=True)

    result = run_demo(Path(args.root), train=not args.no_train, say=say)
    data = {
        "project": str(result.project),
        "source": str(result.source),
        "imported": result.imported,
        "rejected": [{"name": n, "reason": r} for n, r in result.rejected],
        "removed_duplicates": result.removed,
        "captions_changed": result.captions_changed,
        "plan": result.plan,
        "files": [str(f) for f in result.files],
        "grid": str(result.grid) if result.grid else None,
        "run_dir": str(result.run_dir) if result.run_dir else None,
    }
    return Result(data, "" if lines else "\n".join(lines))
