"""Promoting the chosen epoch: a ``<name>-genN`` copy with its card and preview in A1111's Lora folder.

The copy holds the epoch's tensors bit for bit; only its metadata changes (``ss_output_name`` is the
new stem, so A1111 lists it under its own alias), and the writer recomputes the ``sshs_*`` hashes.
Nothing is overwritten: the three files are written into a private folder first and then linked
into place, each refusing a name that exists. Removing the run's other epochs goes through
``_removed/``, so undo brings them back.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit_ext.dataset.trash import RemovalBatch, list_batches, move_to_removed
from lorakit_ext.errors import UserError
from lorakit_ext.export.card import (
    CARD_SUFFIX,
    PREVIEW_SUFFIX,
    SIDECAR_SUFFIXES,
    card_json,
    next_gen_name,
    sd_version_of,
    with_output_name,
)
from lorakit_ext.export.writer import SAVE_DTYPE, SUFFIX, ModuleTensors, epoch_from_file_name, read_lora_file, write_lora_file
from lorakit_ext.fsutil import atomic_write_bytes, atomic_write_json, move_no_clobber
from lorakit_ext.project import Project, confine
from lorakit_ext.project_lock import holding_lock


@dataclass(frozen=True)
class PromoteResult:
    path: Path
    card_path: Path
    preview_path: Path | None
    removed_batch: RemovalBatch | None


def _lora_file(path: Path | str, lora_dir: Path) -> Path:
    """``path`` resolved inside ``lora_dir``; a symbolic link or a missing file is refused."""
    if Path(path).is_symlink():
        raise UserError(f"{path} is a symbolic link; LoRA Kit only promotes and removes regular files")
    resolved = confine(path, lora_dir)
    if not resolved.is_file():
        raise UserError(f"{path} is not a file in {lora_dir}")
    return resolved


def _output_name(epoch_file: Path) -> str:
    base, _, _ = epoch_file.stem.rpartition("-")
    if not base or epoch_from_file_name(epoch_file.name, base) is None:
        raise UserError(f"{epoch_file.name} is not an epoch file (<name>-01{SUFFIX}, <name>-02{SUFFIX}, …)")
    return base


def _modules(tensors: dict[str, torch.Tensor], path: Path) -> list[ModuleTensors]:
    """The file's modules, whatever their type (LoRA, LoCon, LoHa, LoKr: each module's tensors as
    they are), or :class:`UserError` if rewriting it would change a single bit."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        modules.setdefault(name, {})[part] = tensor
    without_alpha = sorted(name for name, parts in modules.items() if parts.get("alpha") is None or parts["alpha"].ndim != 0)
    if without_alpha:
        raise UserError(f"{path.name} is not a LoRA file LoRA Kit can copy exactly (modules without a 0-d alpha, "
                        f"such as {', '.join(without_alpha[:3])})")
    other_dtypes = sorted({str(t.dtype) for t in tensors.values() if t.dtype != SAVE_DTYPE})
    if other_dtypes:
        # The writer saves fp16 like kohya; converting other precisions would not be a copy.
        raise UserError(f"{path.name} holds {', '.join(other_dtypes)} tensors; only fp16 epoch files can be promoted")
    return [ModuleTensors(name, parts) for name, parts in sorted(modules.items())]


def _used_names(project: Project, lora_dir: Path) -> list[str]:
    """Names in ``lora_dir`` plus those that left it for ``_removed/`` (undo may bring them back)."""
    names = os.listdir(lora_dir)
    for batch in list_batches(project):
        for entry in batch.files:
            original = Path(entry.original_path)
            original = original if original.is_absolute() else project.path / original
            if original.parent.resolve() == lora_dir:
                names.append(original.name)
    return names


def _other_epochs(run_files: Iterable[Path], chosen: Path, output_name: str, lora_dir: Path) -> list[Path]:
    """The run's other epoch files that still exist, with their A1111 card files; checked before anything moves."""
    paths: list[Path] = []
    for path in run_files:
        if not Path(path).exists() and not Path(path).is_symlink():
            continue  # already pruned by "keep only last N epochs"
        resolved = _lora_file(path, lora_dir)
        if epoch_from_file_name(resolved.name, output_name) is None:
            raise UserError(f"{resolved.name} is not an epoch file of {output_name}; nothing was promoted or removed")
        if resolved == chosen or resolved in paths:
            continue
        paths.append(resolved)
        for suffix in SIDECAR_SUFFIXES:
            sidecar = resolved.with_name(resolved.stem + suffix)
            if sidecar.is_file() and not sidecar.is_symlink():
                paths.append(sidecar)
    return paths


def _publish(staged: list[tuple[Path, Path]]) -> None:
    """Links each staged file to its final name, or removes the ones already placed and refuses."""
    placed: list[Path] = []
    try:
        for src, dst in staged:
            move_no_clobber(src, dst)
            placed.append(dst)
    except FileExistsError as exc:
        # Only files this call just created are removed: they belong to nobody else yet.
        for dst in placed:
            dst.unlink()
        raise UserError(f"{exc}; nothing was promoted") from None


@holding_lock("promote")
def promote(
    project: Project,
    lora_dir: Path,
    epoch_file: Path,
    *,
    trigger: str,
    preferred_weight: float = 1.0,
    description: str = "",
    sd_version: str = "SD1",
    preview=None,
    remove_other_epochs: bool = False,
    run_files: Iterable[Path] = (),
) -> PromoteResult:
    """Copies ``epoch_file`` to ``<name>-genN.safetensors`` with ``<stem>.json`` and, given a PIL
    ``preview``, ``<stem>.preview.png``; with ``remove_other_epochs`` moves the other files of
    ``run_files`` (and their card files) to the project's ``_removed/``.
    """
    lora_dir = Path(lora_dir).resolve()
    if not lora_dir.is_dir():
        raise UserError(f"Lora folder {lora_dir} does not exist")
    chosen = _lora_file(epoch_file, lora_dir)
    output_name = _output_name(chosen)
    others = _other_epochs(run_files, chosen, output_name, lora_dir) if remove_other_epochs else []
    tensors, metadata = read_lora_file(chosen)
    modules = _modules(tensors, chosen)
    detected = sd_version_of(metadata)
    if detected != "Unknown" and sd_version != detected:
        # A1111 hides a LoRA whose card names another model family than the one loaded.
        raise UserError(f"{chosen.name} is an {detected} LoRA by its metadata, but the card would say {sd_version}")
    card = card_json(trigger, preferred_weight, sd_version, description)

    stem = next_gen_name(_used_names(project, lora_dir), output_name)
    final = lora_dir / f"{stem}{SUFFIX}"
    card_path = lora_dir / f"{stem}{CARD_SUFFIX}"
    preview_path = lora_dir / f"{stem}{PREVIEW_SUFFIX}" if preview is not None else None
    # Staged inside lora_dir, so linking into place is atomic and the LoRA never appears half
    # written. A1111 lists hidden folders too by default, but this one lives only while writing.
    stage = Path(tempfile.mkdtemp(prefix=".lorakit-promote-", dir=lora_dir))
    try:
        staged = [(stage / card_path.name, card_path)]
        atomic_write_json(stage / card_path.name, card)
        if preview_path is not None:
            buffer = io.BytesIO()
            preview.save(buffer, format="PNG")
            atomic_write_bytes(stage / preview_path.name, buffer.getvalue())
            staged.append((stage / preview_path.name, preview_path))
        write_lora_file(stage / final.name, modules, with_output_name(metadata, stem))
        # The LoRA goes last: when A1111 lists it, its card and preview are already there.
        staged.append((stage / final.name, final))
        _publish(staged)
    finally:
        shutil.rmtree(stage, ignore_errors=True)

    batch = None
    if others:
        reason = f"promoted {chosen.name} as {final.name}; other epochs of {output_name} removed"
        batch = move_to_removed(project, others, reason, extra={"lora_dir": str(lora_dir), "promoted": final.name}, allowed_bases=(lora_dir,))
    return PromoteResult(final, card_path, preview_path, batch)
