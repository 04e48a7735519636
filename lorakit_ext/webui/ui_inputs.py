"""What the tab's inputs mean to the library: uploads, captioner options, ◀/▶ navigation, the
project it opens with. No gradio, no A1111."""

from __future__ import annotations

import json
from pathlib import Path

from lorakit_ext.errors import UserError
from lorakit_ext.fsutil import atomic_write_json
from lorakit_ext.project import confine

# The captioner list as shown → the CLI's captioner name, or the A1111 interrogator class.
CAPTIONERS = {
    "Photo captions (BLIP)": "blip",
    "Anime tags (WD tagger)": "wd",
    "Both (BLIP sentence + WD tags)": "both",
    "A1111 BLIP interrogator": "A1111Blip",
    "A1111 DeepDanbooru": "A1111DeepDanbooru",
}


def upload_names(files) -> tuple[list[str], list[str]]:
    """Temp paths and the names the user chose. gradio 3 hands over temp-file objects carrying
    ``orig_name``; gradio 4 hands over paths whose file name is the original one."""
    paths, names = [], []
    for f in files or []:
        path = getattr(f, "name", f)
        paths.append(str(path))
        names.append(Path(getattr(f, "orig_name", None) or path).name)
    return paths, names


def captioner_options(
    choice, blip_model, prefix, beams, min_length, max_length, wd_model, threshold, character_threshold, blacklist, ratings
) -> dict:
    """The form's values under the CLI's option names. A model box only counts for its own
    captioner: the CLI refuses a BLIP model handed to the WD tagger, and the boxes always hold one."""
    kind = CAPTIONERS.get(choice)
    return dict(
        model=(blip_model.strip() or None) if kind in ("blip", "both") else None,
        wd_model=(wd_model.strip() or None) if kind in ("wd", "both") else None,
        prefix=prefix,
        beams=int(beams),
        min_length=int(min_length),
        max_length=int(max_length),
        threshold=float(threshold),
        character_threshold=float(character_threshold),
        blacklist=blacklist,
        ratings=bool(ratings),
    )


def neighbour(names: list[str], current: str | None, step: int) -> str | None:
    """The name ``step`` places from ``current``, wrapping around; the first name when ``current``
    is gone (deduplicated away, say)."""
    if not names:
        return None
    if current not in names:
        return names[0]
    return names[(names.index(current) + step) % len(names)]


# In the projects root, where the tab's choice outlives a reload or a restart; the leading dot
# keeps it out of the project list.
TAB_MEMORY = ".lorakit-tab.json"


def last_project(root: Path, names: list[str]) -> str | None:
    """The project the tab showed last if it still exists, else the first of ``names``."""
    try:
        remembered = json.loads(confine(root / TAB_MEMORY, root).read_text(encoding="utf-8")).get("project")
    except (OSError, ValueError, AttributeError, UserError):
        remembered = None
    return remembered if remembered in names else next(iter(names), None)


def remember_project(root: Path, name: str | None) -> None:
    """Notes ``name`` as the project to open with; a projects root LoRA Kit cannot write to only
    loses the note."""
    if not name or not root.is_dir():
        return
    try:
        atomic_write_json(confine(root / TAB_MEMORY, root), {"project": name})
    except (OSError, UserError):
        pass
