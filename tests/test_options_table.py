"""The README's option table is the one ``TrainConfig`` makes of itself: no option goes unlisted."""

from __future__ import annotations

from pathlib import Path

from lorakit_ext.options_table import options_table, readme_block
from lorakit_ext.train_config import TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_holds_the_table_of_every_option_as_generated():
    assert readme_block() in README.read_text(encoding="utf-8"), "run: python -m lorakit_ext.options_table, paste into README.md"
    rows = options_table().splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == [spec.name for spec in TrainConfig.field_specs()]
    assert any("`reg_data_dir`" in row and row.startswith("| `reg_folders`") for row in rows)
    assert any(row.startswith("| `resolution`") and "`1024`" in row for row in rows)  # SDXL's default beside SD1.5's
