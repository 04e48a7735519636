"""Captioning a project's dataset in batches, safe to stop, crash or run out of memory at any point.

Modes: ``missing`` captions only images without a caption (an existing non-empty caption is never
touched), ``overwrite`` replaces captions, ``prepend``/``append`` add the new tags the caption does
not have yet before/after it. Each batch's captions are written atomically as soon as the batch
is done, so a crash loses at most the batch in flight.

Resuming: ``missing`` resumes by itself (captioned images are skipped). The other modes change
captions that already exist, so a re-run cannot tell done images from the rest; they keep a
journal in ``runs/captioning.json`` (mode, captioner, images done, and the texts of the batch
being written). Running the same mode with the same captioner again continues after the images
done; any other mode or captioner starts afresh. Before each batch is written its final texts go
to the journal; a run that finds such a batch (a crash mid-batch) writes those texts first, so no
caption is ever prepended twice. The journal is deleted when a run completes.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from lorakit_ext.caption.base import Captioner, parallel_map, resolve_device, resolve_dtype
from lorakit_ext.dataset.captions import read_caption, write_caption
from lorakit_ext.dataset.files import dataset_images
from lorakit_ext.dataset.images import inspect_image, normalise
from lorakit_ext.dataset.tags import dedupe_tags, join_tags, split_tags, tag_key
from lorakit_ext.errors import UserError
from lorakit_ext.fsutil import atomic_write_json
from lorakit_ext.project import Project
from lorakit_ext.project_lock import holding_lock
from lorakit_ext.train.events import Interrupted, Progress

MODES = ("missing", "overwrite", "prepend", "append")
JOURNAL = "captioning.json"


@dataclass
class CaptionReport:
    captioner: str
    mode: str
    images: int = 0
    written: list[str] = field(default_factory=list)
    already_captioned: int = 0
    resumed: int = 0
    unchanged: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)
    # The batch size in use at the end: half the one asked for after running out of GPU memory.
    batch_size: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        rate = f" ({len(self.written) / self.seconds:.2f} images/s)" if self.seconds > 0 and self.written else ""
        lines = [
            f"{self.captioner}, mode {self.mode}: wrote {len(self.written)} of {self.images} captions "
            f"in {self.seconds:.1f} s{rate}"
        ]
        if self.already_captioned:
            lines.append(f"  {self.already_captioned} images already had a caption and were left alone")
        if self.resumed:
            lines.append(f"  {self.resumed} images were done by the interrupted run this one continued")
        if self.unchanged:
            lines.append(f"  {len(self.unchanged)} captions left as they were, nothing new for them: {', '.join(self.unchanged)}")
        if self.empty:
            lines.append(f"  no text found for {len(self.empty)} images (left as they were): {', '.join(self.empty)}")
        lines += [f"  unreadable, skipped: {name}: {reason}" for name, reason in self.unreadable.items()]
        return "\n".join(lines)


def combine(mode: str, new: str, existing: str) -> str | None:
    """The caption to write for ``mode``, or None when the file should stay as it is."""
    fresh = dedupe_tags(split_tags(new))
    if mode == "missing" and existing.strip():
        # Checked again at write time: the user may have typed a caption while the batch ran.
        return None
    if mode in ("missing", "overwrite"):
        text = join_tags(fresh)
        return text if text and text != existing else None
    have = {tag_key(t) for t in split_tags(existing)}
    fresh = [t for t in fresh if tag_key(t) not in have]
    if not fresh:
        return None
    if not existing.strip():
        return join_tags(fresh)
    return f"{join_tags(fresh)}, {existing}" if mode == "prepend" else f"{existing}, {join_tags(fresh)}"


def is_out_of_memory(exc: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError is a RuntimeError; other back ends and older torch only say it.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _release(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Journal:
    """``runs/captioning.json``; see the module docstring."""

    def __init__(self, project: Project):
        self.project = project
        self.path = project.runs / JOURNAL
        try:
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.data = None

    def finish_pending(self) -> None:
        """Writes the batch an earlier run had journaled but maybe not finished writing."""
        if not self.data or not self.data.get("pending"):
            return
        for name, text in self.data["pending"].items():
            image = self.project.dataset / name
            if image.is_file():
                write_caption(image, text, project=self.project)
        self.data["done"] = self.data.get("done", []) + list(self.data["pending"])
        self.data["pending"] = {}
        atomic_write_json(self.path, self.data)

    def done_by_same_job(self, mode: str, captioner: str) -> set[str]:
        same = self.data and self.data.get("mode") == mode and self.data.get("captioner") == captioner
        return set(self.data.get("done", [])) if same else set()

    def start(self, mode: str, captioner: str, done: set[str]) -> None:
        self.data = {"mode": mode, "captioner": captioner, "done": sorted(done), "pending": {}}

    def write(self, pending: dict[str, str], processed: list[str]) -> None:
        """Before a batch is written (``processed`` empty) and after (``pending`` empty)."""
        self.data["pending"] = pending
        self.data["done"] = self.data["done"] + processed
        atomic_write_json(self.path, self.data)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _plan(project: Project, mode: str, captioner: str, journal: _Journal, report: CaptionReport) -> list:
    images = dataset_images(project.dataset)
    report.images = len(images)
    if mode == "missing":
        todo = [image for image in images if not read_caption(image, project=project).text.strip()]
        report.already_captioned = len(images) - len(todo)
        return todo
    done = journal.done_by_same_job(mode, captioner)
    todo = [image for image in images if image.name not in done]
    report.resumed = len(images) - len(todo)
    journal.start(mode, captioner, done)
    return todo


def _read_one(path):
    check = inspect_image(path)
    return (path, normalise(check.image), None) if check.ok else (path, None, check.reason)


def _read_batch(paths: list, report: CaptionReport) -> list:
    loaded = []
    for path, image, reason in parallel_map(_read_one, paths):
        if image is None:
            report.unreadable[path.name] = reason
        else:
            loaded.append((path, image))
    return loaded


@holding_lock("captioning")
def caption_project(
    project: Project,
    captioner: Captioner,
    mode: str = "missing",
    batch_size: int = 8,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    device=None,
    dtype=None,
) -> CaptionReport:
    """Captions ``project``'s images with ``captioner``; see the module docstring for the modes.

    ``device``: "auto" (default), "cpu", "cuda"…; ``dtype``: a torch dtype or "auto"/"fp32"/
    "fp16"/"bf16". Raises :class:`Interrupted` when ``should_stop()`` turns true (checked after
    each batch's captions are written) and :class:`UserError` when the GPU runs out of memory even
    after halving the batch size; the captions written until then stay, and running the same call
    again continues.
    """
    if mode not in MODES:
        raise UserError(f"caption mode {mode!r} is not one of {', '.join(MODES)}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, not {batch_size}")
    emit = on_progress or (lambda _p: None)
    stop = should_stop or (lambda: False)
    report = CaptionReport(captioner.name, mode, batch_size=batch_size)
    journal = _Journal(project)
    journal.finish_pending()
    todo = _plan(project, mode, captioner.name, journal, report)
    if not todo:
        if mode != "missing":
            journal.remove()
        return report
    if stop():
        raise Interrupted()
    device = resolve_device(device)
    if dtype is None or isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    emit(Progress("captioning", total_steps=len(todo), message=f"loading {captioner.name} on {device}…"))
    try:
        try:
            captioner.load(device, dtype)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            raise UserError(
                f"not enough GPU memory to load {captioner.name}; close other GPU programs or use the CPU"
            ) from None
        _run_batches(project, captioner, mode, todo, journal if mode != "missing" else None, report, emit, stop, device)
    finally:
        captioner.unload()
        _release(device)
    if mode != "missing":
        journal.remove()
    return report


def _run_batches(project, captioner, mode, todo, journal, report, emit, stop, device) -> None:
    start = time.perf_counter()
    size, halved, position = report.batch_size, False, 0
    while position < len(todo):
        paths = todo[position : position + size]
        loaded = _read_batch(paths, report)
        texts, oom = _caption_batch(captioner, [image for _, image in loaded])
        if oom:
            # The failed batch's tensors are gone with its frames; hand their memory back first.
            _release(device)
            if halved or size == 1:
                raise UserError(
                    f"out of GPU memory captioning with batch size {size}"
                    + (f" (already halved from {report.batch_size})" if halved else "")
                    + f"; the {len(report.written)} captions written so far are kept. Run again with a smaller "
                    "batch size or on the CPU to continue"
                )
            size, halved = max(1, size // 2), True
            continue
        _write_batch(project, mode, loaded, texts, journal, report)
        position += len(paths)
        elapsed = time.perf_counter() - start
        rate = position / elapsed if elapsed > 0 else None
        emit(
            Progress(
                "captioning",
                step=position,
                total_steps=len(todo),
                it_per_s=rate,
                eta_s=(len(todo) - position) / rate if rate else None,
                message=f"captioned {position}/{len(todo)} images" + (f" ({rate:.2f} images/s)" if rate else ""),
            )
        )
        report.seconds = round(elapsed, 3)
        if position < len(todo) and stop():
            raise Interrupted(
                f"stopped after {position} of {len(todo)} images; run the same captioning again to continue"
            )
    report.batch_size = size


def _caption_batch(captioner, images: list) -> tuple[list[str], bool]:
    if not images:
        return [], False
    try:
        texts = captioner.caption(images)
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        return [], True
    finally:
        for image in images:
            image.close()
    if len(texts) != len(images):
        raise RuntimeError(f"{captioner.name} returned {len(texts)} captions for {len(images)} images")
    return texts, False


def _write_batch(project, mode, loaded, texts, journal, report) -> None:
    finals = {}
    for (path, _), new in zip(loaded, texts):
        existing = read_caption(path, project=project).text
        final = combine(mode, new, existing)
        if final is not None:
            finals[path.name] = final
        elif not new.strip():
            report.empty.append(path.name)
        else:
            report.unchanged.append(path.name)
    if journal is not None:
        journal.write(finals, [])
    for name, text in finals.items():
        write_caption(project.dataset / name, text, project=project)
        report.written.append(name)
    if journal is not None:
        journal.write({}, [path.name for path, _ in loaded])
