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


MARK_COLOUR = (0, 150, 70)


def compose_grid(cells: list[list[Image.Image]], column_labels: list[str], row_labels: list[str], *,
                 marked: str | None = None) -> Image.Image:
    """``cells[row][column]`` → one image with a label bar above each column and beside each row;
    the column labelled ``marked`` (the suggested epoch) is framed and its label says so."""
    cell_w, cell_h = cells[0][0].size
    label_w = max(60, 7 * max(len(r) for r in row_labels))
    grid = Image.new("RGB", (label_w + cell_w * len(column_labels), LABEL_HEIGHT + cell_h * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels):
        draw.text((label_w + c * cell_w + 4, 4), f"{label} (suggested)" if label == marked else label,
                  fill=MARK_COLOUR if label == marked else "black")
    for r, row in enumerate(cells):
        draw.text((4, LABEL_HEIGHT + r * cell_h + cell_h // 2 - 6), row_labels[r], fill="black")
        for c, cell in enumerate(row):
            grid.paste(cell.resize((cell_w, cell_h)), (label_w + c * cell_w, LABEL_HEIGHT + r * cell_h))
    if marked in column_labels:
        left = label_w + column_labels.index(marked) * cell_w
        draw.rectangle([left, LABEL_HEIGHT, left + cell_w - 1, grid.height - 1], outline=MARK_COLOUR, width=3)
    return grid


def grid_of_cells(plan: GridPlan, cells: dict, weight: float = 1.0, *, marked: str | None = None) -> Image.Image:
    """The grid image of :func:`render_epoch_cells`' cells at one LoRA weight."""
    labels = [label for label, _ in plan.columns]
    rows = [[cells[label, seed, weight] for label in labels] for seed in plan.seeds]
    return compose_grid(rows, labels, [f"seed {s}" for s in plan.seeds], marked=marked)


def render_epoch_cells(model, plan: GridPlan, prompt: str, *, negative: str = "", size=(256, 256), steps: int = 20, weight: float = 1.0,
                       zero_terminal_snr: bool = False) -> dict[tuple[str, int, float], Image.Image]:
    """Every cell of ``plan`` as ``{(column label, seed, weight): image}``: the key shape of the cells
    taken from A1111's grid, so :mod:`~lorakit_ext.compare.epoch_metrics` measures both alike."""
    from lorakit_ext.compare.sample import lora_merged, sample

    labels = [label for label, _ in plan.columns]
    # Cells are keyed by label and seed: a repeated one would silently overwrite another cell.
    for what, values in (("column label", labels), ("seed", plan.seeds)):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"the grid repeats the {what} {', '.join(repeated)}")
    cells = {}
    for label, path in plan.columns:
        with lora_merged(model.sd_model, path, weight, model.family):
            for seed in plan.seeds:
                cells[label, seed, weight] = sample(model, prompt, negative, seed=seed, size=size, steps=steps,
                                                    zero_terminal_snr=zero_terminal_snr)
    return cells


def render_epoch_grid(model, plan: GridPlan, prompt: str, *, negative: str = "", size=(256, 256), steps: int = 20, weight: float = 1.0,
                      zero_terminal_snr: bool = False) -> Image.Image:
    cells = render_epoch_cells(model, plan, prompt, negative=negative, size=size, steps=steps, weight=weight,
                               zero_terminal_snr=zero_terminal_snr)
    return grid_of_cells(plan, cells, weight)
