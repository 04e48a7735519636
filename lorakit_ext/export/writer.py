"""Writing and reading kohya-format LoRA files, epoch file names, and pruning a run's old epochs.

A file holds ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and a 0-d ``<name>.alpha`` per
module (LoHa and LoKr modules their own tensors, :mod:`lorakit_ext.export.network_types`), all fp16
like kohya's default save precision, plus string metadata. ``sshs_model_hash`` and
``sshs_legacy_hash`` are computed the way sd-scripts precomputes them, so A1111 and the
additional-networks extension need not hash the file when they list it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from lorakit_ext.dataset.trash import RemovalBatch, move_to_removed
from lorakit_ext.errors import UserError
from lorakit_ext.fsutil import atomic_write_bytes
from lorakit_ext.project import Project

SUFFIX = ".safetensors"
SAVE_DTYPE = torch.float16


@dataclass(frozen=True)
class ModuleWeights:
    """One LoRA module: ``down`` ``[r,in]`` or ``[r,in,kh,kw]``, ``up`` ``[out,r]`` or ``[out,r,1,1]``."""

    kohya_name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    def file_tensors(self) -> dict[str, torch.Tensor]:
        _check_module(self)
        return {"lora_down.weight": self.down, "lora_up.weight": self.up, "alpha": torch.tensor(float(self.alpha))}


@dataclass(frozen=True)
class ModuleTensors:
    """One module of any type A1111 loads: its tensors by their key after the name (``hada_w1_a``,
    ``lokr_w1`` …), a 0-d ``alpha`` among them."""

    kohya_name: str
    tensors: Mapping[str, torch.Tensor]

    def file_tensors(self) -> dict[str, torch.Tensor]:
        alpha = self.tensors.get("alpha")
        if alpha is None or alpha.ndim != 0 or not math.isfinite(float(alpha)):
            raise ValueError(f"{self.kohya_name}: alpha {alpha} is not a finite 0-d tensor")
        return dict(self.tensors)


@dataclass(frozen=True)
class WrittenFile:
    path: Path
    model_hash: str  # sshs_model_hash: sha256 of the bytes after the header
    legacy_hash: str  # sshs_legacy_hash
    num_modules: int
    metadata: dict[str, str]


def _check_module(m: ModuleWeights) -> None:
    down, up = m.down, m.up
    shapes = f"{m.kohya_name}: down {tuple(down.shape)}, up {tuple(up.shape)}"
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise ValueError(f"{shapes}: expected two 2-d (Linear) or two 4-d (Conv2d) tensors")
    if up.shape[1] != down.shape[0]:
        raise ValueError(f"{shapes}: the ranks differ")
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise ValueError(f"{shapes}: a conv LoRA's up weight is 1×1")
    if not math.isfinite(float(m.alpha)):
        raise ValueError(f"{m.kohya_name}: alpha {m.alpha} is not a finite number")


def _tensors(modules: list[ModuleWeights | ModuleTensors]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    names: set[str] = set()
    for m in modules:
        if not m.kohya_name or "." in m.kohya_name:
            raise ValueError(f"{m.kohya_name!r} is not a kohya module name")
        if m.kohya_name in names:
            raise ValueError(f"module {m.kohya_name} is listed twice")
        names.add(m.kohya_name)
        # kohya keeps alpha as a 0-d buffer and casts it with the weights on save.
        for part, tensor in m.file_tensors().items():
            tensors[f"{m.kohya_name}.{part}"] = tensor.detach().to("cpu", SAVE_DTYPE).contiguous()
    return tensors


def tensor_bytes(data: bytes) -> bytes:
    """The bytes of a serialised safetensors file after its header (independent of the metadata)."""
    header_length = int.from_bytes(data[:8], "little")
    return data[8 + header_length :]


def _kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    # sd-scripts hashes a serialisation holding only the ss_* metadata: the legacy hash reads 64 KiB
    # at 1 MiB into the file, which the header's length shifts; the new hash skips the header.
    data = safetensors.torch.save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    model_hash = hashlib.sha256(tensor_bytes(data)).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def write_lora_file(path: Path, modules: list[ModuleWeights | ModuleTensors], metadata: dict[str, str], *, replace: bool = True) -> WrittenFile:
    """Writes ``modules`` and ``metadata`` to ``path`` atomically; ``ss_output_name`` becomes the stem.
    ``replace=False``: ``FileExistsError`` instead of replacing an existing file."""
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"{path} must end in {SUFFIX}")
    if not modules:
        raise ValueError("a LoRA file needs at least one module")
    bad = sorted(k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str))
    if bad:
        raise ValueError(f"metadata values must be strings: {', '.join(map(str, bad))}")
    tensors = _tensors(modules)
    # A1111 lists a LoRA under its ss_output_name; two files with one alias hide each other.
    metadata = {**metadata, "ss_output_name": path.stem}
    model_hash, legacy_hash = _kohya_hashes(tensors, metadata)
    metadata.update(sshs_model_hash=model_hash, sshs_legacy_hash=legacy_hash)
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=metadata), replace=replace)
    return WrittenFile(path, model_hash, legacy_hash, len(modules), metadata)


def read_lora_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file (header only), or ``{}`` when it is not readable as one."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (OSError, safetensors.SafetensorError):
        return {}


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, or :class:`UserError` saying why not."""
    path = Path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except FileNotFoundError:
        raise UserError(f"LoRA file {path} does not exist") from None
    except (OSError, safetensors.SafetensorError) as exc:
        raise UserError(f"{path} is not a readable safetensors file: {exc}") from None
    return tensors, metadata


# ---- epoch files --------------------------------------------------------------------------------
def epoch_file_name(output_name: str, epoch: int) -> str:
    """``<name>-01.safetensors`` … ``<name>-99.safetensors``, then ``<name>-100.safetensors``."""
    if epoch < 1:
        raise ValueError(f"epoch {epoch} is not a positive number")
    return f"{output_name}-{epoch:02d}{SUFFIX}"


def epoch_from_file_name(file_name: str, output_name: str) -> int | None:
    """The epoch of an epoch file of ``output_name``, or None for any other name (``<name>-gen0``…)."""
    prefix = f"{output_name}-"
    if not (file_name.startswith(prefix) and file_name.endswith(SUFFIX)):
        return None
    number = file_name[len(prefix) : -len(SUFFIX)]
    if not number.isdigit() or not number.isascii():
        return None
    epoch = int(number)
    # Only the exact spelling we write: "-001" or "-1" were not written by epoch_file_name.
    return epoch if epoch >= 1 and epoch_file_name(output_name, epoch) == file_name else None


def prune_epoch_files(folder: Path, output_name: str, keep_last: int, written_by_this_run: list[Path]) -> list[Path]:
    """The epoch files of this run in ``folder`` beyond the newest ``keep_last`` (0 keeps all).

    Only paths in ``written_by_this_run`` are candidates, so another run's epochs, promoted
    ``<name>-genN`` files and anything else sharing the prefix are never returned. Removes nothing.
    """
    if keep_last < 0:
        raise ValueError(f"keep_last {keep_last} is negative")
    if keep_last == 0:
        return []
    folder = Path(folder).resolve()
    by_epoch: dict[int, Path] = {}
    for path in map(Path, written_by_this_run):
        epoch = epoch_from_file_name(path.name, output_name)
        if epoch is None or path.is_symlink() or not path.is_file() or path.parent.resolve() != folder:
            continue
        by_epoch[epoch] = path
    ordered = [by_epoch[e] for e in sorted(by_epoch)]
    return ordered[:-keep_last] if len(ordered) > keep_last else []


def remove_old_epochs(
    project: Project, lora_dir: Path, output_name: str, keep_last: int, written_by_this_run: list[Path]
) -> RemovalBatch | None:
    """Moves this run's epoch files beyond the newest ``keep_last`` into the project's ``_removed/``.

    Returns the batch (undo restores it), or None when nothing was old enough.
    """
    stale = prune_epoch_files(lora_dir, output_name, keep_last, written_by_this_run)
    if not stale:
        return None
    reason = f"keep only the last {keep_last} epochs of {output_name}"
    return move_to_removed(project, stale, reason, extra={"lora_dir": str(lora_dir)}, allowed_bases=(Path(lora_dir),))
