"""Regularisation images drawn by the model the LoRA trains on, from the dataset's own captions
without the trigger: kohya's prior preservation (``reg_data_dir``, ``prior_loss_weight``) wants
pictures of what the captions describe as the base model draws it, minus what the LoRA is to learn.

The drawing is a ``render(prompt, seed)`` the front door brings (A1111's txt2img in the tab, LoRA
Kit's DDIM headless) on the model it already holds, so no second copy is loaded. Images go to
``<project>/reg/`` as ``reg-0001.png`` + ``reg-0001.txt`` (the prompt as caption), numbered after
every ``reg-NNNN`` name already there: nothing in the folder is replaced or removed. Image number
``n`` is drawn from caption ``(n - 1) mod len(captions)`` at ``seed + n - 1``, so a fresh folder
comes out the same every time and a second run continues the series instead of repeating it.

The caller holds the project's lock (``ProjectLock(project.path, …)``) around the drawing, taken
before it loads a model so that a busy project is refused at once.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from lorakit_ext.dataset.captions import load_captions
from lorakit_ext.dataset.folders import line_path
from lorakit_ext.dataset.tags import as_tags, dedupe_tags, join_tags, remove_tags, split_tags
from lorakit_ext.errors import UserError
from lorakit_ext.fsutil import atomic_write_bytes, stale_temp_files
from lorakit_ext.project import Project

REG_LINE = "1 reg"
_NUMBERED = re.compile(r"^reg-(\d+)\.", re.IGNORECASE)

# One image (a PIL image) of ``prompt`` at ``seed``; None when the renderer was stopped first.
Render = Callable[[str, int], object]
# ``(images written, images asked for, the image just written or None at the start)``.
OnProgress = Callable[[int, int, "Path | None"], None]


def reg_prompts(captions: Iterable[str], trigger: str | Sequence[str]) -> list[str]:
    """Each caption without the trigger's tags (matched ignoring case and spacing), its other
    tags in order; a caption of nothing else becomes the empty prompt."""
    return [join_tags(remove_tags(split_tags(caption), trigger)) for caption in captions]


def dataset_reg_prompts(project: Project, trigger: str | Sequence[str]) -> list[str]:
    """:func:`reg_prompts` of the dataset's captions, one per image in name order."""
    captions = load_captions(project)
    if not captions:
        raise UserError(f"project {project.name!r} has no images, so no captions to draw from; import images first")
    return reg_prompts(captions.values(), trigger)


def prompts_note(trigger: str | Sequence[str]) -> str:
    """What the prompts were made of, for the report under the images."""
    tags = dedupe_tags(as_tags(trigger))
    if not tags:
        return "no trigger was given, so the prompts are the captions as they are"
    return f"prompts: the dataset's captions without {join_tags(tags)!r}"


def next_number(folder: Path) -> int:
    """The number after the highest ``reg-NNNN.*`` name in ``folder`` (any extension, any case)."""
    if not folder.is_dir():
        return 1
    return max((int(m.group(1)) for name in os.listdir(folder) if (m := _NUMBERED.match(name))), default=0) + 1


def with_reg_line(reg_folders: str, project: Project) -> str:
    """``reg_folders`` naming the project's ``reg/``: ``1 reg`` when empty, else the line appended
    unless a line names that folder already (a folder named twice is refused by training)."""
    lines = [line.strip() for line in reg_folders.splitlines()]
    target = project.reg.resolve()
    if any(line_path(line, project.path)[1].resolve() == target for line in lines if line and not line.startswith("#")):
        return reg_folders
    kept = reg_folders.rstrip()
    return f"{kept}\n{REG_LINE}" if kept else REG_LINE


@dataclass
class RegReport:
    folder: Path
    asked: int
    written: list[Path] = field(default_factory=list)
    stopped: bool = False

    def as_dict(self) -> dict:
        return {"folder": str(self.folder), "asked": self.asked, "written": [str(p) for p in self.written],
                "stopped": self.stopped, "reg_line": REG_LINE}

    def text(self) -> str:
        names = f" ({self.written[0].name} … {self.written[-1].name})" if self.written else ""
        done = f"wrote {len(self.written)} of {self.asked} regularisation images to {self.folder}{names}"
        return f"stopped: {done}" if self.stopped else done


def write_reg_images(
    project: Project,
    prompts: Sequence[str],
    render: Render,
    *,
    seed: int,
    count: int | None = None,
    on_progress: OnProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RegReport:
    """Draws ``count`` images (default: one per prompt) into ``project.reg`` as the module
    docstring says. ``should_stop()`` is asked before each image and after it is drawn: a stop
    asked meanwhile discards it, since a renderer stopped mid-way may hand back what it had
    (A1111 decodes the latents it reached). What was written stays, each image with its caption."""
    if not prompts:
        raise UserError(f"project {project.name!r} has no captions to draw regularisation images from; import images first")
    count = len(prompts) if count is None else count
    if count < 1:
        raise UserError(f"the number of regularisation images must be at least 1, not {count}")
    emit = on_progress or (lambda done, total, path: None)
    stop = should_stop or (lambda: False)
    # Checked before mkdir, which would otherwise create the folder through a symlink's target.
    folder = project.inside(project.reg)
    folder.mkdir(exist_ok=True)
    # A killed run's temp files under our own names are ours to remove; nothing else in reg/ is.
    for leftover in stale_temp_files(folder, lambda name: bool(_NUMBERED.match(name))):
        leftover.unlink(missing_ok=True)
    report = RegReport(folder, count)
    emit(0, count, None)
    number = next_number(folder)
    while len(report.written) < count:
        index = number - 1
        prompt = prompts[index % len(prompts)]
        image = None if stop() else render(prompt, seed + index)
        if image is None or stop():
            report.stopped = True
            break
        number = _publish(folder, number, _png(image), prompt)
        report.written.append(folder / f"{_stem(number)}.png")
        emit(len(report.written), count, report.written[-1])
        number += 1
    return report


def _stem(number: int) -> str:
    return f"reg-{number:04d}"


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _publish(folder: Path, number: int, png: bytes, caption: str) -> int:
    """Writes the pair under the first free number from ``number`` on and returns that number.
    The caption goes first: a crash between the two leaves a lone caption, which trains nothing,
    never an image without its caption. A name taken meanwhile (the user is free to add files)
    moves the pair on to the next number."""
    while True:
        number = max(number, next_number(folder))
        caption_file, image_file = folder / f"{_stem(number)}.txt", folder / f"{_stem(number)}.png"
        try:
            atomic_write_bytes(caption_file, caption.encode("utf-8"), replace=False)
        except FileExistsError:
            number += 1
            continue
        try:
            atomic_write_bytes(image_file, png, replace=False)
        except FileExistsError:
            caption_file.unlink()  # written just above, by us
            number += 1
            continue
        return number
