"""Small real datasets for tests: distinct images with captions, in two aspect ratios."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(200, 40, 30), (40, 70, 190), (30, 150, 60), (230, 200, 60), (120, 40, 160), (20, 180, 190)]


def fill_dataset(folder: Path, count: int = 4, trigger: str = "kat") -> list[Path]:
    """Writes ``count`` PNGs (64×64, then 64×128) with ``<trigger>, …`` captions into ``folder``."""
    paths = []
    for i in range(count):
        size = (64, 64) if i < 2 else (64, 128)
        image = Image.new("RGB", size, COLOURS[i % len(COLOURS)])
        ImageDraw.Draw(image).ellipse([8, 8, 40, 40 + i * 8], fill=(250, 215, 180))
        path = Path(folder) / f"img{i}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(f"{trigger}, red hair, colour {i}, smile")
        paths.append(path)
    return paths
