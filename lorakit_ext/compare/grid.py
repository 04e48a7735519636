"""An epoch × seed grid as one labelled PIL image (the CLI's stand-in for A1111's X/Y/Z plot)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

LABEL_HEIGHT = 20


@dataclass(frozen=True)
class GridPlan:
    """Columns are LoRA files (None = the base model without LoRA), rows are seeds."""

    columns: list[tuple[str, Path | None]]
    seeds: list[int]


def epoch_grid_plan(files: list[Path], seeds: list[int], baseline: bool = True) -> GridPlan:
    columns = ([("no LoRA", None)] if baseline else []) + [(Path(f).stem, Path(f)) for f in files]
    return GridPlan(columns, seeds)


def compose_grid(cells: list[list[Image.Image]], column_labels: list[str], row_labels: list[str]) -> Image.Image:
    """``cells[row][column]`` → one image with a label bar above each column and beside each row."""
    cell_w, cell_h = cells[0][0].size
    label_w = max(60, 7 * max(len(r) for r in row_labels))
    grid = Image.new("RGB", (label_w + cell_w * len(column_labels), LABEL_HEIGHT + cell_h * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels):
        draw.text((label_w + c * cell_w + 4, 4), label, fill="black")
    for r, row in enumerate(cells):
        draw.text((4, LABEL_HEIGHT + r * cell_h + cell_h // 2 - 6), row_labels[r], fill="black")
        for c, cell in enumerate(row):
            grid.paste(cell.resize((cell_w, cell_h)), (label_w + c * cell_w, LABEL_HEIGHT + r * cell_h))
    return grid


def render_epoch_grid(model, plan: GridPlan, prompt: str, *, negative: str = "", size=(256, 256), steps: int = 20, weight: float = 1.0,
                      zero_terminal_snr: bool = False) -> Image.Image:
    from lorakit_ext.compare.sample import lora_merged, sample

    cells = [[None] * len(plan.columns) for _ in plan.seeds]
    for c, (_, path) in enumerate(plan.columns):
        with lora_merged(model.sd_model, path, weight, model.family):
            for r, seed in enumerate(plan.seeds):
                cells[r][c] = sample(model, prompt, negative, seed=seed, size=size, steps=steps, zero_terminal_snr=zero_terminal_snr)
    return compose_grid(cells, [label for label, _ in plan.columns], [f"seed {s}" for s in plan.seeds])
