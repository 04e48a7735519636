"""The repository stands on its own: nothing a user reads points at files it does not ship.

Code, docs and dev tools may cite public sources (kohya sd-scripts, kohya-colab), never the notes
and benchmark folders that lived beside the project while it was written. Tests may still use
their local harness, so ``tests/`` is not scanned.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["lorakit_ext", "dev", "scripts", "javascript", "README.md", "install.py", "pyproject.toml", "style.css", ".ci"]
# "shared/" as a folder of its own (not e.g. ``modules.shared``), and the documents that were in it.
FOREIGN = re.compile(r"(?:^|[\s`'\"(/])shared/|DESIGN\.md|perf-anchor|perf\.md")


def shipped_text_files():
    for name in SHIPPED:
        path = ROOT / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        for file in files:
            try:
                yield file, file.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue


def test_nothing_points_outside_the_repository():
    hits = [
        f"{file.relative_to(ROOT)}:{n}: {line.strip()}"
        for file, text in shipped_text_files()
        for n, line in enumerate(text.splitlines(), 1)
        if FOREIGN.search(line)
    ]
    assert hits == []
