"""The README's table of training options, made from ``TrainConfig``'s own field metadata, so the
table and the form, the CLI and the API never say different things (a test holds the README to it).

Pure: no torch. ``python -m lorakit_ext.options_table`` prints it.
"""

from __future__ import annotations

from lorakit_ext.kohya_options import RENAMED
from lorakit_ext.models.family_presets import SDXL_SETTINGS
from lorakit_ext.train_config import TrainConfig

BEGIN = "<!-- options table: python -m lorakit_ext.options_table -->"
END = "<!-- end of options table -->"


def _cell(text: str) -> str:
    # "<name>" would read as an HTML tag in a Markdown table and vanish.
    return str(text).replace("|", "\\|").replace("<", "\\<").replace("\n", " ")


def _value(value) -> str:
    if value == "":
        return "(empty)"
    return f"`{value}`"


def options_table() -> str:
    """A Markdown table: each option, its kohya name where that differs, its default (SD1.5 and
    SD2; SDXL's where the XL trainer's differs) and what it does."""
    kohya = {ours: theirs for theirs, ours in RENAMED.items()}
    sdxl = SDXL_SETTINGS.defaults
    rows = ["| Option | kohya name | Default | SDXL default | What it does |", "|---|---|---|---|---|"]
    for spec in TrainConfig.field_specs():
        meta = spec.metadata
        rows.append("| " + " | ".join([
            f"`{spec.name}` ({_cell(meta['label'])})",
            f"`{kohya[spec.name]}`" if spec.name in kohya else "",
            _cell(_value(spec.default)),
            _cell(_value(sdxl[spec.name])) if spec.name in sdxl else "",
            _cell(meta["help"]),
        ]) + " |")
    return "\n".join(rows)


def readme_block() -> str:
    return f"{BEGIN}\n{options_table()}\n{END}"


if __name__ == "__main__":
    print(readme_block())
